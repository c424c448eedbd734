"""The studio's training routes: upload a zip of images, train a model on it in its own process, watch
its progress (server-sent events) and its sample grids, cancel it, then find the new run among the
served models.

Every route that changes anything (upload, train, cancel) needs the server's token, checked by the gate
(guard.py) before a byte of the body is read: `imagegen serve` makes one at start and prints it, as
Jupyter does (or takes --token); no token is 401, a wrong one 403. Everything is written under the work
folder, RUNS_DIR/studio/: uploads/ID/ (the unpacked files), logs/, and runs/ (the trained runs, served).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ImagegenError
from .common import Api, bad_request, load_served
from .jobs import (AE_SHARE, LATENT_FAMILIES, MAX_TRAIN_MINUTES, MAX_ZIP_BYTES, TRAIN_FAMILIES, StudioFull, TrainJob,
                   UploadError, check_room, clear_partials, start_training, store_upload)

EVENT_EVERY_S = 0.5


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    upload: str = Field(pattern=r"^[0-9a-f]{16}$", description="the id POST /api/upload answered")
    family: str = Field(default="dcgan", description=f"one of {', '.join(TRAIN_FAMILIES)}")
    minutes: float = Field(default=1.0, gt=0, le=MAX_TRAIN_MINUTES, description="the training time budget")
    latent: bool = Field(default=False, description=f"an autoencoder first ({AE_SHARE:.0%} of the minutes), then the "
                         f"family on its latents: for colour images of 64 px and more ({', '.join(LATENT_FAMILIES)})")


def training_router(api: Api, root: Path) -> tuple[APIRouter, Callable[[], None]]:
    """/api/upload, /api/train and its status, grid, events and cancel; and the function that ends the
    training job when the server stops."""
    router = APIRouter()
    work = root / "studio"
    state: dict = {"job": None}
    clear_partials(work / "uploads")

    def stop() -> None:
        job: TrainJob | None = state["job"]
        if job is not None:
            job.stop()

    def training_upload() -> set[str]:
        job: TrainJob | None = state["job"]
        return {job.upload} if job is not None and job.process.poll() is None else set()

    def serve_run(folder: Path) -> str:
        """The served name of a run that training finished (its path under RUNS_DIR, as find_runs names
        runs), loading it the first time it is asked for."""
        name = folder.relative_to(root).as_posix()
        if name not in api.runs:
            api.runs[name] = load_served(name, folder, api.engine)
        return name

    @router.post("/api/upload")
    async def upload_route(archive: UploadFile = File(..., description="a zip of images (class folders or captions)")) -> dict:
        """Unpack a zip of images into an upload folder named by the zip's content (the same zip twice is
        stored once); answers its id for POST /api/train. 507 while the studio folder or the disk is full."""
        try:
            check_room(work)
        except StudioFull as e:
            raise bad_request(str(e), 507) from None
        with tempfile.NamedTemporaryFile(suffix=".zip") as tmp:
            size = 0
            while block := await archive.read(1 << 20):
                size += len(block)
                if size > MAX_ZIP_BYTES:
                    raise bad_request(f"the zip is over the upload limit of {MAX_ZIP_BYTES} bytes", 413)
                tmp.write(block)
            tmp.flush()
            if size == 0:
                raise bad_request("empty upload")
            keep = training_upload()
            try:
                return await api.worker.call(lambda: store_upload(Path(tmp.name), work / "uploads", keep))
            except StudioFull as e:
                raise bad_request(str(e), 507) from None
            except UploadError as e:
                raise bad_request(str(e)) from None

    @router.post("/api/train")
    async def train_route(req: TrainRequest) -> dict:
        """Start training on an upload (one job at a time: 409 while one runs)."""
        job: TrainJob | None = state["job"]
        if job is not None and job.process.poll() is None:
            raise bad_request("a training job is running; cancel it or wait for it", 409)
        folder = work / "uploads" / req.upload
        if not folder.is_dir():
            raise bad_request(f"unknown upload {req.upload!r}", 404)
        try:
            state["job"] = start_training(folder, req.upload, req.family, req.minutes, work / "runs", work / "logs",
                                          latent=req.latent)
        except UploadError as e:
            raise bad_request(str(e)) from None
        return state["job"].status()

    @router.post("/api/train/cancel")
    async def cancel_route() -> dict:
        job: TrainJob | None = state["job"]
        if job is None:
            raise bad_request("no training job", 404)
        await asyncio.get_running_loop().run_in_executor(None, job.cancel)
        return job.status()

    def status() -> dict:
        job: TrainJob | None = state["job"]
        if job is None:
            return {"state": "none"}
        out = job.status()
        out["error"] = out["error"].replace(f"{root}/", "")   # the log's paths, relative to RUNS_DIR
        if out["state"] == "done" and job.run_dir() is not None:
            try:
                out["model"] = serve_run(job.run_dir())   # found once, then remembered by the job
            except ImagegenError as e:   # a run folder that does not load is reported, not served
                out["state"], out["error"] = "failed", f"the trained run does not load: {e}"
        return out

    @router.get("/api/train/families")
    async def train_families() -> list[str]:
        """The families the studio trains (each family's file declares it: trains_in_studio)."""
        return list(TRAIN_FAMILIES)

    @router.get("/api/train/latent-families")
    async def latent_families() -> list[str]:
        """The families the studio also trains on latents (`latent`: each family's file declares it)."""
        return list(LATENT_FAMILIES)

    @router.get("/api/train")
    async def train_status() -> dict:
        """The training job: state (none, running, done, failed, cancelled), step, losses, its run, and
        for a latent job its stage (autoencoder, then model)."""
        return status()

    @router.get("/api/train/grid", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def train_grid() -> Response:
        """The newest sample grid of the training job (every GRID_EVERY steps, and at the end)."""
        job: TrainJob | None = state["job"]
        grid = job.latest_grid() if job is not None else None
        if grid is None:
            raise bad_request("no sample grid yet", 404)
        # The bytes, read once: a FileResponse takes the length and the body in two looks at the file.
        return Response(grid.read_bytes(), media_type="image/png", headers={"Cache-Control": "no-store"})

    @router.get("/api/train/events")
    async def train_events() -> StreamingResponse:
        """Server-sent events: the job's status every half second until it stops."""
        async def events():
            while True:
                now = status()
                yield f"data: {json.dumps(now)}\n\n"
                if now["state"] != "running":
                    return
                await asyncio.sleep(EVENT_EVERY_S)
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    return router, stop
