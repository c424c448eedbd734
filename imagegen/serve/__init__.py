"""`imagegen serve RUNS_DIR`: the web page and HTTP API over trained runs.

app.py      the FastAPI app, its error handlers and the routers of generation, images and the page
            (each route group an APIRouter, included by create_app)
common.py   what every route shares: limits, request bodies, the served runs, checks, uploads, PNG answers
worker.py   the model thread: admission, the deadline, micro-batches
studio.py   the studio's routes: variations, breeding, sketches, latent directions
training.py training from the browser: uploads, the training job, its events; the token
jobs.py     safe unpacking of uploaded zips and the training process
"""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
