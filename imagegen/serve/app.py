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
import contextlib
import os
from pathlib import Path
from typing import Literal

import torch
from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from ..directions import direction_shift
from .. import requests
from ..requests import HTTP, InpaintRequest, SampleRequest, TranslateRequest
from ..runtime.engine import check_engine
from ..errors import ImagegenError
from ..models import SAMPLE_OPTIONS
from ..sample import SEED, check_latent, extend_image, generate, hwc_to_float, interpolate, to_mask
from ..version import __version__
from . import worker as W
from .common import (MAX_NAME_CHARS, SERVED_SUFFIXES, AnalyseRequest, Api, GenerateRequest, InterpolateRequest, ModelInfo,
                     SkippedRun, command_header, decode_upload, find_runs, options_of, png_response, read_upload, upload_name)
from .guard import LOOPBACK, Guard, Policy
from .worker import MAX_BATCH, Busy, GenItem, Worker

STATIC = Path(__file__).resolve().parent.parent / "static"


def create_app(runs_dir: str | Path, *, log=print, token: str | None = None, engine: str = "torch",
               hosts: tuple[str, ...] = LOOPBACK, token_everywhere: bool = False) -> FastAPI:
    """The app over the runs under runs_dir, behind the gate of guard.py. `token`: what the routes that
    change anything (upload, train, cancel) require, and with `token_everywhere` every route but /health
    (a server reachable off loopback); None = no token (loopback only: serve()). `hosts`: the names the
    Host header may carry. `engine`: what runs the networks (imagegen.runtime.engine)."""
    from .studio import studio_router
    from .training import training_router
    root = Path(runs_dir).resolve()
    if not root.is_dir():
        raise ImagegenError(f"{runs_dir}: not a folder")
    skipped: dict[str, str] = {}
    runs = find_runs(root, log=log, engine=check_engine(engine), skipped=skipped)
    worker = Worker()
    api = Api(runs, worker, engine, skipped)
    training, stop_training = training_router(api, root)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        stop_training()            # a training job ends with the server

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN into this origin. The schema
    # stays at /openapi.json, for programs and for any OpenAPI viewer the user runs.
    app = FastAPI(title="imagegen", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Generate, interpolate, translate, inpaint and score images with trained imagegen runs.")
    app.add_middleware(Guard, policy=Policy(frozenset(h.lower() for h in hosts), token, token_everywhere))
    app.state.runs, app.state.worker, app.state.skipped = runs, worker, skipped
    add_error_handlers(app)
    for router in (generation_router(api), image_router(api), studio_router(api), training, page_router(api)):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.openapi = lambda: served_openapi(app, runs)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal is one JSON line: busy and late are 503 with Retry-After, the library's typed errors
    400, invalid fields 422 naming each field."""
    @app.exception_handler(Busy)
    async def busy(_: Request, __: Busy) -> JSONResponse:
        return JSONResponse({"detail": f"busy: {W.MAX_PENDING} requests in progress; retry shortly"}, status_code=503,
                            headers={"Retry-After": str(W.RETRY_AFTER_S)})

    @app.exception_handler(asyncio.TimeoutError)
    async def late(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"not answered within the {W.DEADLINE_S:g} s deadline; retry with less work"},
                            status_code=503, headers={"Retry-After": str(W.RETRY_AFTER_S)})

    @app.exception_handler(ImagegenError)
    async def library_error(_: Request, e: ImagegenError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        # One readable line per problem ("n: Input should be less than or equal to 64") as well as the list.
        lines = [f"{'.'.join(str(p) for p in err.get('loc', [])[1:]) or 'body'}: {err.get('msg', 'invalid')}" for err in e.errors()]
        return JSONResponse({"detail": "; ".join(lines), "errors": _plain(e.errors())}, status_code=422)


def generation_router(api: Api) -> APIRouter:
    """/health, /api/models, /api/generate (micro-batched) and /api/interpolate."""
    router = APIRouter()
    runs, worker = api.runs, api.worker
    get, seed_range = api.get, api.seed_range
    check_work, generator_of = api.check_work, api.generator_of

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": len(runs), "pending": worker.pending}

    @router.get("/api/models", response_model=list[ModelInfo])
    async def models(response: Response) -> list[ModelInfo]:
        """Every served run: name, family, classes, sampling options, latent sliders, domains. The header
        X-Imagegen-Skipped counts the run folders that were found but not served (GET /api/skipped)."""
        response.headers["X-Imagegen-Skipped"] = str(len(api.skipped))
        return [s.info() for s in runs.values()]

    @router.get("/api/skipped")
    async def skipped() -> list[SkippedRun]:
        """The run folders found but not served, each with its one-line reason."""
        return [SkippedRun(name=name, reason=reason) for name, reason in api.skipped.items()]

    @router.post("/api/generate", response_class=Response,
                 responses={200: {"content": {"image/png": {}}, "description": "one PNG (a grid when n > 1)"}})
    async def generate_route(req: GenerateRequest) -> Response:
        """Images for seeds seed .. seed + n - 1. The header X-Imagegen-Command holds the matching
        `imagegen sample` command."""
        served = generator_of(get(req.model))
        seeds = seed_range(req.seed, req.n)
        ask = SampleRequest(seeds, labels=req.label or None, prompt=req.prompt, negative_prompt=req.negative_prompt,
                            options=options_of(req), latent=req.latent, directions=req.directions, names=HTTP)
        ready = ask.check(served.run)
        opts, labels, latent, model = ready.options, ready.labels, ready.latent or [], served.model
        check_work(served, req.n, opts)
        if req.directions:
            latent = check_latent(model, await worker.call(lambda: direction_shift(model, req.directions))) or []
        words = {"prompts": req.prompt, "negative_prompt": req.negative_prompt}

        def work(items: list[GenItem]) -> list[torch.Tensor]:
            all_seeds = [s for it in items for s in it.seeds]
            all_labels = None if items[0].labels is None else torch.cat([it.labels for it in items])
            images = generate(model, all_seeds, labels=all_labels, batch_size=MAX_BATCH, latent=latent or None,
                              **words, **opts)
            return list(torch.split(images, [it.size for it in items]))

        key = (served.name, tuple(sorted(opts.items())), tuple(latent), req.prompt, req.negative_prompt)
        images = await worker.batched(key, work, GenItem(seeds, labels))
        return png_response(images, headers=command_header(ask, served) | {"X-Imagegen-Seeds": f"{seeds[0]}-{seeds[-1]}"})

    @router.post("/api/interpolate", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def interpolate_route(req: InterpolateRequest) -> Response:
        """A strip of `frames` images through latent space from seed_a to seed_b. The header
        X-Imagegen-Command holds the matching `imagegen interpolate` command."""
        served = generator_of(get(req.model))
        ask = requests.InterpolateRequest(seeds=[req.seed_a, req.seed_b], frames=req.frames, labels=req.label or None, names=HTTP)
        labels = ask.check(served.run).labels
        images = await worker.call(lambda: interpolate(served.model, req.seed_a, req.seed_b, req.frames, labels))
        return png_response(images, nrow=req.frames, headers=command_header(ask, served))

    return router


def image_router(api: Api) -> APIRouter:
    """Routes that take an uploaded image or score samples: /api/translate, /api/inpaint, /api/analyse."""
    router = APIRouter()
    worker, get, labels_for = api.worker, api.get, api.labels_for
    seed_range, check_work, generator_of = api.seed_range, api.check_work, api.generator_of

    @router.post("/api/translate", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def translate_route(model: str = Form(..., max_length=MAX_NAME_CHARS), direction: Literal["a2b", "b2a"] = Form("a2b"),
                              image: UploadFile = File(...)) -> Response:
        """An uploaded image translated to the other domain (cyclegan models), at the model's size. The
        header X-Imagegen-Command holds the matching `imagegen translate` command."""
        served = get(model)
        ask = TranslateRequest(upload_name(image, "image.png"), direction)
        ask.check(served.run)
        cfg = served.model.cfg
        x = hwc_to_float(decode_upload(await read_upload(image, "image"), "image", cfg.channels, cfg.image_size))
        out = await worker.call(lambda: served.model.translate(x, direction))
        return png_response(out, headers=command_header(ask, served))

    @router.post("/api/inpaint", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def inpaint_route(model: str = Form(..., max_length=MAX_NAME_CHARS), seed: int = Form(0, **SEED.bounds()),
                            label: str | None = Form(None, max_length=200),
                            steps: int | None = Form(None, **SAMPLE_OPTIONS["steps"].bounds()),
                            guidance: float | None = Form(None, **SAMPLE_OPTIONS["guidance"].bounds()),
                            image: UploadFile = File(...), mask: UploadFile = File(...)) -> Response:
        """Fill the white pixels of `mask` in `image` (diffusion and VAE models); known pixels are kept exactly.
        The header X-Imagegen-Command holds the matching `imagegen inpaint` command."""
        served = generator_of(get(model))
        ask = InpaintRequest([seed], labels=label or None, image=upload_name(image, "image.png"),
                             mask=upload_name(mask, "mask.png"), names=HTTP,
                             options={k: v for k, v in (("steps", steps), ("guidance", guidance)) if v is not None})
        ready = ask.check(served.run)
        x = hwc_to_float(decode_upload(await read_upload(image, "image"), "image", served.model.cfg.channels))
        # RePaint runs about 5 passes per step, each over the whole canvas: the canvas counts as its pixels.
        check_work(served, 1, ready.options, pixels=x.shape[-2] * x.shape[-1], passes=5)
        # White (>= 128 of 255) = generate; a mask of another size or with no white pixel is a 400.
        mask01 = to_mask(decode_upload(await read_upload(mask, "mask"), "mask", 1), "mask", *x.shape[-2:])
        out = await worker.call(lambda: extend_image(served.model, x, mask01, seed, ready.labels, **ready.options))
        return png_response(out, headers=command_header(ask, served))

    @router.post("/api/analyse")
    async def analyse_route(req: AnalyseRequest) -> dict:
        """Per-image scores for seeds seed .. seed + n - 1: the discriminator's score (GANs), and the
        evaluator's class and confidence when the run's dataset has a cached evaluator."""
        from ..evaluate.analyse import score_images
        served = generator_of(get(req.model))
        seeds = seed_range(req.seed, req.n)
        labels = labels_for(served, req.label, seeds)
        check_work(served, req.n, {})
        return await worker.call(lambda: score_images(served.run, seeds, labels))

    return router


def page_router(api: Api) -> APIRouter:
    """The page and the run folders' own files."""
    runs = api.runs
    router = APIRouter()

    @router.get("/files/{model_and_path:path}", include_in_schema=False)
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

    @router.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return router


def served_openapi(app: FastAPI, runs: dict) -> dict:
    """The OpenAPI schema with the served run names as examples of every `model` field, so that clients
    (and schemathesis) see them; made once."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for component in schema.get("components", {}).get("schemas", {}).values():
            prop = component.get("properties", {}).get("model")
            if prop is not None and runs:
                prop["examples"] = sorted(runs)
        app.openapi_schema = schema
    return app.openapi_schema


def _plain(errors: list) -> list:
    """Validation errors made JSON-safe (pydantic may put exceptions or bytes in 'ctx' and 'input')."""
    out = []
    for err in errors:
        out.append({"loc": [str(p) for p in err.get("loc", [])], "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    return out


def serve(runs_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, threads: int = 0,
          token: str | None = None, no_token: bool = False, engine: str = "torch",
          allow_hosts: tuple[str, ...] = ()) -> None:
    """Serve until stopped. The routes that change anything need a token (off loopback every route does):
    `token`, or one made here and printed in the page's address (as Jupyter does); `no_token` only on a
    loopback host. The Host header must name this server: an IP address, "localhost", `host` (and this
    machine's names when `host` is a wildcard such as 0.0.0.0) or one of `allow_hosts`."""
    import secrets
    import socket

    import uvicorn
    if no_token and host not in LOOPBACK:
        raise ImagegenError(f"--no-token is allowed only on a loopback host ({', '.join(LOOPBACK)}), not --host {host}: "
                            "anyone who reaches the port could upload files and start training")
    if no_token and token:
        raise ImagegenError("give --token or --no-token, not both")
    if token is not None and len(token) < 8:
        raise ImagegenError("--token must be at least 8 characters")
    token = None if no_token else token or secrets.token_urlsafe(24)
    local = host in LOOPBACK
    names = set(LOOPBACK) | {host} | set(allow_hosts)   # IP addresses are accepted as well (guard.py)
    if host in ("0.0.0.0", "::"):
        names |= {socket.gethostname(), socket.getfqdn()}
    # torch's threads for the model work; by default all cores but one, which stays free for the event
    # loop (HTTP parsing, validation, PNG encoding), so a request never waits for a core to parse it.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    app = create_app(runs_dir, token=token, engine=engine, hosts=tuple(names), token_everywhere=not local)
    where = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    print(f"serving {len(app.state.runs)} run(s) from {runs_dir} at {where} (the API's schema at /openapi.json)")
    if not local:
        print(f"answering to the host names {', '.join(sorted(names))} (add others with --allow-host)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["create_app", "serve"]
