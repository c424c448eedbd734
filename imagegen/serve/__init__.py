"""`imagegen serve RUNS_DIR`: the web page and HTTP API over trained runs.

app.py      the FastAPI app, its limits, the model worker, and the generation routes
studio.py   the studio's routes: variations and breeding (issue 17)
"""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
