"""The app of `imagegen serve RUNS_DIR`: the web page and the HTTP API over trained runs (FastAPI on
uvicorn), its limits, and the generation routes; the studio's routes (variations, sketches, directions)
are in studio.py, training from the browser and its token in training.py.

A thin layer over the library: every route validates its input (pydantic models, then the library's own
checks, whose typed errors become 4xx answers), runs the library call in one worker thread, and encodes
PNG or JSON. Two routes are fixed for other programs: `GET /api/models` and `POST /api/generate`.

Load: the model work runs in a single thread (torch parallelises each call over the cores), and at
most MAX_PENDING requests are admitted at once; the next one gets 503 with Retry-After at once, so
overload costs nothing but a quick refusal. Concurrent /api/generate requests for the same model and
options are micro-batched into one call: correct because an image depends only on its seed, whatever
the batch it is drawn in (models/base.py).

Files: the page's own static folder, and the PNG and HTML files inside the run folders the server was
given (through /files/MODEL/PATH, resolved and checked to stay inside the run folder); nothing else.
"""

from __future__ import annotations

import asyncio
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from ..checkpoint import Run, load_run
from ..directions import MAX_DIRECTIONS, direction_shift
from ..engine import check_engine, engine_of, use_engine
from ..data.folder import decode_image
from ..errors import ImagegenError, ImageTooLargeError
from ..models.ddpm import ETA
from ..models.gan import TRUNCATION
from ..models.vae import TEMPERATURE
from ..text import MAX_PROMPT_CHARS, check_prompt
from ..sample import (MAX_LATENT_SHIFT, MAX_SEED, SEED, check_latent, check_options, extend_image, generate, grid,
                     hwc_to_float, interpolate, resolve_labels, to_mask, to_pil, to_uint8)

STATIC = Path(__file__).resolve().parent.parent / "static"

# Limits. Each is checked before any work is done, and exceeding one is a 4xx that names it.
MAX_IMAGES = 64                 # images per request (n, seeds, frames)
MAX_STEPS = 100                 # diffusion sampling steps per request
MAX_DIFFUSION_WORK = 1600       # images x steps per diffusion request (e.g. 16 x 100, 64 x 25)
ADAPTIVE_STEPS = 100            # what the flow's adaptive solver counts as (it took 38 to 74 calls in tests)
MAX_FRAMES = 16                 # interpolation frames
MAX_LATENT_DIMS = 16            # latent sliders
MAX_UPLOAD_BYTES = 2 << 20      # one uploaded file
MAX_UPLOAD_PIXELS = 1 << 20     # width x height of one uploaded image (decompression bombs stop here)
MAX_PENDING = 32                # requests admitted at once (queued or running); more get 503
MAX_BATCH = 64                  # images per micro-batched call
BATCH_WAIT_S = 0.001            # a batch waits this long for requests on their way (8 clients: p50 16 ms, not 20)
DEADLINE_S = 30.0               # a request not answered by then gets 503 (its work is dropped if not started)
RETRY_AFTER_S = 1
RUN_SEARCH_DEPTH = 3            # run folders are found up to this deep under RUNS_DIR
SERVED_SUFFIXES = {".png", ".html", ".json"}


class Busy(Exception):
    pass


# --- request bodies ------------------------------------------------------------------------------------

Seed = Field(default=0, **SEED.bounds(), description="the image's seed: the same seed gives the same image")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a name from GET /api/models")
    seed: int = Seed
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, description="images: seeds seed .. seed + n - 1 (a grid when n > 1)")
    label: str | None = Field(default=None, max_length=200, description="class name or index (conditional models)")
    latent: list[float] = Field(default_factory=list, max_length=MAX_LATENT_DIMS,
                                description=f"shift of the first latent dimensions, each within +-{MAX_LATENT_SHIFT:g} (GANs, VAEs)")
    directions: list[float] = Field(default_factory=list, max_length=MAX_DIRECTIONS,
                                    description="moves along the model's principal latent directions (GANSpace), "
                                                "each in [-5, 5] (GANs, VAEs)")
    truncation: float | None = Field(default=None, **TRUNCATION.bounds(), description="GANs: clamp the latent to +-t (0 = off)")
    temperature: float | None = Field(default=None, **TEMPERATURE.bounds(), description="VAEs: scale of the latent noise")
    guidance: float | None = Field(default=None, ge=0, le=20, description="diffusion: classifier-free guidance scale")
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="diffusion: sampling steps")
    eta: float | None = Field(default=None, **ETA.bounds(), description="diffusion: DDIM eta (0 = deterministic)")
    sampler: Literal["ddim", "ddpm"] | None = Field(default=None, description="diffusion: sampler")
    solver: Literal["euler", "midpoint", "heun", "dopri5"] | None = Field(default=None, description="flow: ODE solver (dopri5: adaptive)")
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="what to draw (models trained on captions)")
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS,
                                        description="what to steer away from (models trained on captions)")


class InterpolateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    seed_a: int = Seed
    seed_b: int = Field(default=1, **SEED.bounds())
    frames: int = Field(default=8, ge=2, le=MAX_FRAMES)
    label: str | None = Field(default=None, max_length=200)


class AnalyseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    seed: int = Seed
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    label: str | None = Field(default=None, max_length=200)


class ModelInfo(BaseModel):
    name: str
    family: str
    classes: list[str]
    conditional: bool
    translates: bool
    inpaints: bool
    image_size: int
    channels: int
    step: int
    data: str | None
    options: dict[str, str]
    latent_dims: int
    domains: list[str]
    text: bool = False     # trained on captions: takes a prompt
    varies: bool = False   # POST /api/vary works for it (a latent space, or a denoiser to re-noise with)


OPTION_FIELDS = ("truncation", "temperature", "guidance", "steps", "eta", "sampler", "solver")


# --- the served runs -----------------------------------------------------------------------------------

@dataclass
class Served:
    name: str
    run: Run

    @property
    def model(self):
        return self.run.model

    def info(self) -> ModelInfo:
        m, cfg = self.run.model, self.run.model.cfg
        return ModelInfo(
            name=self.name, family=self.run.family, classes=self.run.classes if m.conditional else [],
            conditional=m.conditional, translates=m.translates, inpaints=hasattr(m, "inpaint"),
            image_size=cfg.image_size, channels=cfg.channels,
            step=self.run.step, data=self.run.data_source,
            options={k: h for k, (_, h) in m.sample_options.items() if k in OPTION_FIELDS},
            latent_dims=int(getattr(cfg, "z_dim", 0)) if hasattr(m, "draw_noise") else 0,
            domains=[cfg.domain_a, cfg.domain_b] if m.translates else [], text=m.reads_text,
            varies=not m.translates and (hasattr(m, "edit") or hasattr(m, "draw_noise")))


def load_served(name: str, folder: Path, engine: str = "torch") -> Served:
    """The run in `folder`, served as `name`, sampling with `engine` (imagegen.engine; onnxruntime exports
    each network the first time a request needs it)."""
    run = load_run(folder)
    use_engine(run.model, engine)
    return Served(name, run)


def find_runs(root: Path, log=print, engine: str = "torch") -> dict[str, Served]:
    """Every loadable run folder at or under root, up to RUN_SEARCH_DEPTH deep, named by its path relative
    to root (root itself by its folder name). Broken runs are reported and left out."""
    folders = [root] + [p.parent for d in range(1, RUN_SEARCH_DEPTH + 1) for p in sorted(root.glob("*/" * d + "config.json"))]
    runs: dict[str, Served] = {}
    for folder in folders:
        if not (folder / "config.json").is_file():
            continue
        name = root.name if folder == root else folder.relative_to(root).as_posix()
        try:
            runs[name] = load_served(name, folder, engine)
        except ImagegenError as e:
            if log:
                log(f"not serving {folder}: {e}")
    return runs


# --- admission, deadline and micro-batching -------------------------------------------------------------

class Worker:
    """One thread for model work, a cap on admitted requests, and micro-batches of generate calls."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagegen-model")
        self.pending = 0
        self.queues: dict[Any, list] = {}
        self.draining: set = set()              # keys whose drain task is running
        self.tasks: set = set()

    def admit(self) -> None:
        if self.pending >= MAX_PENDING:
            raise Busy()
        self.pending += 1

    async def call(self, fn: Callable[[], Any]) -> Any:
        """fn() in the model thread, under admission and the deadline."""
        self.admit()
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self.executor, fn), DEADLINE_S)
        finally:
            self.pending -= 1

    async def batched(self, key: Any, work: Callable[[list], list], item: Any) -> Any:
        """work([items]) -> [results], with the items of concurrent requests that share `key` gathered
        into one call: while one call runs, new requests queue, and the next call takes them all."""
        self.admit()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self.queues.setdefault(key, []).append((item, future))
            if key not in self.draining:
                self.draining.add(key)
                task = loop.create_task(self._drain(key, work))
                self.tasks.add(task)                    # asyncio keeps only weak references to tasks
                task.add_done_callback(self.tasks.discard)
            return await asyncio.wait_for(future, DEADLINE_S)
        finally:
            self.pending -= 1

    async def _drain(self, key: Any, work: Callable[[list], list]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._drain_queue(key, work, loop)
        finally:
            self.draining.discard(key)
            if not self.queues.get(key):
                self.queues.pop(key, None)

    async def _drain_queue(self, key: Any, work: Callable[[list], list], loop) -> None:
        while self.queues.get(key):
            queue = self.queues[key]
            if len(queue) < MAX_BATCH:
                await asyncio.sleep(BATCH_WAIT_S)   # let the clients just answered send their next requests
            jobs, size = [], 0
            while queue and (not jobs or size + queue[0][0].size <= MAX_BATCH):
                job = queue.pop(0)
                if not job[1].done():               # a request past its deadline is dropped, not computed
                    jobs.append(job)
                    size += job[0].size
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self.executor, work, [item for item, _ in jobs])
                for (_, fut), result in zip(jobs, results):
                    if not fut.done():
                        fut.set_result(result)
            except Exception as e:                  # the library's typed errors reach each request
                for _, fut in jobs:
                    if not fut.done():
                        fut.set_exception(e)
            await asyncio.sleep(0)                  # let requests that arrived meanwhile join the queue


@dataclass
class GenItem:
    seeds: list[int]
    labels: torch.Tensor | None

    @property
    def size(self) -> int:
        return len(self.seeds)


# --- helpers --------------------------------------------------------------------------------------------

def png_bytes(images: torch.Tensor, nrow: int | None = None) -> bytes:
    """One image as itself, several as a grid."""
    img = to_pil(to_uint8(images)[0]) if images.shape[0] == 1 else grid(images, nrow=nrow)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_response(images: torch.Tensor, nrow: int | None = None, headers: dict | None = None) -> Response:
    return Response(png_bytes(images, nrow), media_type="image/png", headers=headers or {})


def bad_request(message: str, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


async def read_upload(upload: UploadFile, what: str) -> bytes:
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise bad_request(f"{what}: over the upload limit of {MAX_UPLOAD_BYTES} bytes", 413)
    if not data:
        raise bad_request(f"{what}: empty file")
    return data


def decode_upload(data: bytes, what: str, channels: int, size: int | None = None) -> np.ndarray:
    """An uploaded PNG/JPEG/WebP -> H x W x channels uint8 (fitted to size x size if given), decoded
    exactly as `imagegen` decodes the same file on disk. Too many pixels (checked from the header,
    before decoding) or a decompression bomb is 413; anything unreadable is an ImageFileError (400)."""
    try:
        return decode_image(io.BytesIO(data), what, size, channels, max_pixels=MAX_UPLOAD_PIXELS)
    except ImageTooLargeError as e:
        raise bad_request(str(e), 413) from None


def sample_command(served: Served, seeds: list[int], label: str | None, opts: dict, latent: list[float],
                   prompt: str | None = None, negative_prompt: str | None = None, directions: list[float] = ()) -> str:
    """The `imagegen sample` command that draws the same images."""
    seed_text = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    parts = ["imagegen", "sample", str(served.run.path), "--seeds", seed_text]
    if engine_of(served.model) != "torch":
        parts += ["--engine", engine_of(served.model)]
    if label is not None:
        parts += ["--labels", _quote(label)]
    if prompt is not None:
        parts += ["--prompt", _quote(prompt)]
    if negative_prompt is not None:
        parts += ["--negative-prompt", _quote(negative_prompt)]
    if directions:
        parts += ["--directions", ",".join(repr(float(v)) for v in directions)]
    elif latent:
        parts += ["--latent", ",".join(f"{v:g}" for v in latent)]
    for k, v in opts.items():
        parts += [f"--{k}", f"{v:g}" if isinstance(v, float) else str(v)]
    return " ".join(parts + ["--out", "samples/"])


def _quote(text: str) -> str:
    return text if text.replace("-", "").replace("_", "").isalnum() else "'" + text.replace("'", "'\\''") + "'"


# --- the app --------------------------------------------------------------------------------------------

class Api:
    """What every route needs: the served runs, the model worker, and the checks that turn a request's
    fields into library arguments (bad ones are 4xx answers that name them)."""

    def __init__(self, runs: dict[str, Served], worker: Worker, engine: str = "torch") -> None:
        self.runs, self.worker, self.engine = runs, worker, engine

    def get(self, name: str) -> Served:
        if name not in self.runs:
            raise bad_request(f"unknown model {name!r} (GET /api/models lists them)", 404)
        return self.runs[name]

    def labels_for(self, served: Served, label: str | None, seeds: list[int]) -> torch.Tensor | None:
        return resolve_labels(served.model, served.run.classes, label or None, seeds, what="label")

    def family_options(self, served: Served, given: dict) -> dict:
        return check_options(served.model, given, prefix="")

    def seed_range(self, seed: int, n: int) -> list[int]:
        if seed + n - 1 > MAX_SEED:
            raise bad_request(f"seed + n - 1 is over the largest seed {MAX_SEED}")
        return list(range(seed, seed + n))

    def check_diffusion_work(self, served: Served, n: int, opts: dict) -> None:
        if "steps" in served.model.sample_options:
            steps = opts.get("steps") or served.model.cfg.sample_steps
            if (opts.get("solver") or getattr(served.model.cfg, "solver", None)) == "dopri5":
                steps = ADAPTIVE_STEPS                  # it picks its own steps: count it as this many
            if n * steps > MAX_DIFFUSION_WORK:
                raise bad_request(f"{n} images x {steps} steps is over the limit of {MAX_DIFFUSION_WORK} image-steps per request")

    def generator_of(self, served: Served) -> Served:
        if served.model.translates:
            raise bad_request(f"model {served.name!r} translates images: use POST /api/translate")
        return served

    def check_prompts(self, served: Served, **texts: str | None) -> None:
        """Prompts refused before any work: for a model without text, empty, too long."""
        for name, text in texts.items():
            if text is not None:
                if not served.model.reads_text:
                    raise bad_request(f"model {served.name!r} was not trained on captions: it takes no {name}")
                check_prompt(text, name)


def latin1(text: str) -> str:
    """A header value: HTTP headers are Latin-1, so a prompt outside it is written with escapes there."""
    return text.encode("latin-1", "backslashreplace").decode("latin-1")



def create_app(runs_dir: str | Path, *, log=print, token: str | None = None, engine: str = "torch") -> FastAPI:
    """The app over the runs under runs_dir. `token`: what the routes that change anything (upload,
    train, cancel) require in their X-Imagegen-Token header; None = no token (loopback only: serve()).
    `engine`: what runs the networks (imagegen.engine)."""
    root = Path(runs_dir).resolve()
    if not root.is_dir():
        raise ImagegenError(f"{runs_dir}: not a folder")
    runs = find_runs(root, log=log, engine=check_engine(engine))
    worker = Worker()
    app = FastAPI(title="imagegen", version=__import__("imagegen").__version__,
                  description="Generate, interpolate, translate, inpaint and score images with trained imagegen runs.")
    app.state.runs, app.state.worker = runs, worker

    @app.exception_handler(Busy)
    async def busy(_: Request, __: Busy) -> JSONResponse:
        return JSONResponse({"detail": f"busy: {MAX_PENDING} requests in progress; retry shortly"}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(asyncio.TimeoutError)
    async def late(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"not answered within the {DEADLINE_S:g} s deadline; retry with less work"},
                            status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(ImagegenError)
    async def library_error(_: Request, e: ImagegenError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        # One readable line per problem ("n: Input should be less than or equal to 64") as well as the list.
        lines = [f"{'.'.join(str(p) for p in err.get('loc', [])[1:]) or 'body'}: {err.get('msg', 'invalid')}" for err in e.errors()]
        return JSONResponse({"detail": "; ".join(lines), "errors": _plain(e.errors())}, status_code=422)

    api = Api(runs, worker, engine)
    get, labels_for, family_options, seed_range = api.get, api.labels_for, api.family_options, api.seed_range
    check_diffusion_work, generator_of = api.check_diffusion_work, api.generator_of

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": len(runs), "pending": worker.pending}

    @app.get("/api/models", response_model=list[ModelInfo])
    async def models() -> list[ModelInfo]:
        """Every served run: name, family, classes, sampling options, latent sliders, domains."""
        return [s.info() for s in runs.values()]

    @app.post("/api/generate", response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "one PNG (a grid when n > 1)"}})
    async def generate_route(req: GenerateRequest) -> Response:
        """Images for seeds seed .. seed + n - 1. The header X-Imagegen-Command holds the matching
        `imagegen sample` command."""
        served = generator_of(get(req.model))
        seeds = seed_range(req.seed, req.n)
        opts = family_options(served, {k: getattr(req, k) for k in OPTION_FIELDS if getattr(req, k) is not None})
        check_diffusion_work(served, req.n, opts)
        labels = labels_for(served, req.label, seeds)
        latent = check_latent(served.model, req.latent) or []
        model = served.model
        if req.directions:
            if latent:
                raise bad_request("give latent or directions, not both")
            latent = check_latent(model, await worker.call(lambda: direction_shift(model, req.directions))) or []
        words = {"prompts": req.prompt, "negative_prompt": req.negative_prompt}
        api.check_prompts(served, prompt=req.prompt, negative_prompt=req.negative_prompt)

        def work(items: list[GenItem]) -> list[torch.Tensor]:
            all_seeds = [s for it in items for s in it.seeds]
            all_labels = None if items[0].labels is None else torch.cat([it.labels for it in items])
            images = generate(model, all_seeds, labels=all_labels, batch_size=MAX_BATCH, latent=latent or None,
                              **words, **opts)
            return list(torch.split(images, [it.size for it in items]))

        key = (served.name, tuple(sorted(opts.items())), tuple(latent), req.prompt, req.negative_prompt)
        images = await worker.batched(key, work, GenItem(seeds, labels))
        command = latin1(sample_command(served, seeds, req.label or None, opts, latent, req.prompt, req.negative_prompt,
                                        req.directions))
        return png_response(images, headers={"X-Imagegen-Command": command, "X-Imagegen-Seeds": f"{seeds[0]}-{seeds[-1]}"})

    @app.post("/api/interpolate", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def interpolate_route(req: InterpolateRequest) -> Response:
        """A strip of `frames` images through latent space from seed_a to seed_b."""
        served = generator_of(get(req.model))
        labels = labels_for(served, req.label, [req.seed_a])
        images = await worker.call(lambda: interpolate(served.model, req.seed_a, req.seed_b, req.frames, labels))
        return png_response(images, nrow=req.frames)

    @app.post("/api/translate", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def translate_route(model: str = Form(...), direction: Literal["a2b", "b2a"] = Form("a2b"),
                              image: UploadFile = File(...)) -> Response:
        """An uploaded image translated to the other domain (cyclegan models), at the model's size."""
        served = get(model)
        if not served.model.translates:
            raise bad_request(f"model {model!r} is a {served.run.family} model, not a translation model")
        cfg = served.model.cfg
        x = hwc_to_float(decode_upload(await read_upload(image, "image"), "image", cfg.channels, cfg.image_size))
        out = await worker.call(lambda: served.model.translate(x, direction))
        return png_response(out)

    @app.post("/api/inpaint", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def inpaint_route(model: str = Form(...), seed: int = Form(0, **SEED.bounds()),
                            label: str | None = Form(None, max_length=200),
                            steps: int | None = Form(None, ge=1, le=MAX_STEPS),
                            guidance: float | None = Form(None, ge=0, le=20),
                            image: UploadFile = File(...), mask: UploadFile = File(...)) -> Response:
        """Fill the white pixels of `mask` in `image` (diffusion and VAE models); known pixels are kept exactly."""
        served = generator_of(get(model))
        if not hasattr(served.model, "inpaint"):
            raise bad_request(f"inpainting needs a diffusion or VAE model; {model!r} is a {served.run.family} model")
        x = hwc_to_float(decode_upload(await read_upload(image, "image"), "image", served.model.cfg.channels))
        # White (>= 128 of 255) = generate; a mask of another size or with no white pixel is a 400.
        mask01 = to_mask(decode_upload(await read_upload(mask, "mask"), "mask", 1), "mask", *x.shape[-2:])
        opts = family_options(served, {k: v for k, v in (("steps", steps), ("guidance", guidance)) if v is not None})
        check_diffusion_work(served, 5, opts)          # RePaint runs about 5 passes per step
        labels = labels_for(served, label, [seed])
        out = await worker.call(lambda: extend_image(served.model, x, mask01, seed, labels, **opts))
        return png_response(out)

    @app.post("/api/analyse")
    async def analyse_route(req: AnalyseRequest) -> dict:
        """Per-image scores for seeds seed .. seed + n - 1: the discriminator's score (GANs), and the
        evaluator's class and confidence when the run's dataset has a cached evaluator."""
        from ..evaluate.analyse import score_images
        served = generator_of(get(req.model))
        seeds = seed_range(req.seed, req.n)
        labels = labels_for(served, req.label, seeds)
        check_diffusion_work(served, req.n, {})
        return await worker.call(lambda: score_images(served.run, seeds, labels))

    @app.get("/files/{model_and_path:path}", include_in_schema=False)
    async def run_file(model_and_path: str) -> FileResponse:
        # The longest served run name that prefixes the path, then a file strictly inside that run folder.
        for name in sorted(runs, key=len, reverse=True):
            if model_and_path.startswith(name + "/"):
                folder = runs[name].run.path.resolve()
                target = (folder / model_and_path[len(name) + 1:]).resolve()
                if target.is_relative_to(folder) and target.is_file() and target.suffix in SERVED_SUFFIXES:
                    return FileResponse(target)
                break
        raise HTTPException(status_code=404, detail="not found")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    def openapi() -> dict:
        # The served run names as examples of every `model` field, so clients (and schemathesis) see them.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for component in schema.get("components", {}).get("schemas", {}).values():
                prop = component.get("properties", {}).get("model")
                if prop is not None and runs:
                    prop["examples"] = sorted(runs)
            app.openapi_schema = schema
        return app.openapi_schema

    from .studio import add_studio_routes
    from .training import add_training_routes
    add_studio_routes(app, api)
    add_training_routes(app, api, root, token)
    app.openapi = openapi
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _plain(errors: list) -> list:
    """Validation errors made JSON-safe (pydantic may put exceptions or bytes in 'ctx' and 'input')."""
    out = []
    for err in errors:
        out.append({"loc": [str(p) for p in err.get("loc", [])], "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    return out


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(runs_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, threads: int = 0,
          token: str | None = None, no_token: bool = False, engine: str = "torch") -> None:
    """Serve until stopped. The routes that change anything need a token: `token`, or one made here and
    printed in the page's address (as Jupyter does); `no_token` only on a loopback host."""
    import secrets

    import uvicorn
    if no_token and host not in LOOPBACK:
        raise ImagegenError(f"--no-token is allowed only on a loopback host ({', '.join(LOOPBACK)}), not --host {host}: "
                            "anyone who reaches the port could upload files and start training")
    if no_token and token:
        raise ImagegenError("give --token or --no-token, not both")
    if token is not None and len(token) < 8:
        raise ImagegenError("--token must be at least 8 characters")
    token = None if no_token else token or secrets.token_urlsafe(24)
    # torch's threads for the model work; by default all cores but one, which stays free for the event
    # loop (HTTP parsing, validation, PNG encoding), so a request never waits for a core to parse it.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    app = create_app(runs_dir, token=token, engine=engine)
    where = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    print(f"serving {len(app.state.runs)} run(s) from {runs_dir} at {where} (API docs at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["create_app", "serve"]
