"""What the routes of `imagegen serve` share (app.py, studio.py, training.py): the limits, the request
bodies, the served runs, and the helpers that check a request against a run, decode uploads and encode
answers. A thin layer over the library: a bad field becomes a 4xx answer that names it."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from fastapi import HTTPException, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from ..checkpoint import Run, load_run
from ..directions import MAX_DIRECTIONS
from ..runtime.engine import engine_of, use_engine
from ..data.folder import decode_image
from ..errors import ConfigError, ImagegenError, ImageTooLargeError
from ..models import SAMPLE_OPTIONS
from ..text import MAX_PROMPT_CHARS
from ..sample import MAX_LATENT_SHIFT, MAX_SEED, SEED, grid, resolve_labels, to_pil, to_uint8
from .worker import Worker, stop_if_late


# Limits. Each is checked before any work is done, and exceeding one is a 4xx that names it.
MAX_IMAGES = 64                 # images per request (n, seeds, frames)
MAX_STEPS = SAMPLE_OPTIONS["steps"].bounds()["le"]   # sampling steps per request (models/ddpm.py MAX_SERVED_STEPS)
MAX_WORK = 1600                 # one request's work in image-steps at the model's own size (Api.check_work):
                                # 16 images x 100 steps, 64 x 25, or a 64 px inpaint on a 32 px model at 40 steps
# A canvas k times the model's pixels costs k ** CANVAS_EXPONENT images: convolutions grow with the pixels,
# self-attention with their square. One RePaint step of the test suite's 32 px U-Net took 0.18 s on a
# 32 px canvas, 0.56 s at 64 and 4.6 s at 128 (x8.2 for x4 pixels between the last two: k ** 1.5).
CANVAS_EXPONENT = 1.5
ADAPTIVE_STEPS = 100            # what the flow's adaptive solver counts as (it took 38 to 74 calls in tests)
MAX_FRAMES = 16                 # interpolation frames
MAX_LATENT_DIMS = 16            # latent sliders
MAX_UPLOAD_BYTES = 2 << 20      # one uploaded file
MAX_UPLOAD_PIXELS = 1 << 20     # width x height of one uploaded image (decompression bombs stop here)
MAX_MODEL_BYTES = 1 << 30       # a served model's weights (checked on the meta device before allocating)
MAX_NAME_CHARS = 300            # a model's name (a run's path under RUNS_DIR)
RUN_SEARCH_DEPTH = 3            # run folders are found up to this deep under RUNS_DIR
SERVED_SUFFIXES = {".png", ".html", ".json"}


# --- request bodies ------------------------------------------------------------------------------------

Seed = Field(default=0, **SEED.bounds(), description="the image's seed: the same seed gives the same image")


class GenerateBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=MAX_NAME_CHARS, description="a name from GET /api/models")
    seed: int = Seed
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, description="images: seeds seed .. seed + n - 1 (a grid when n > 1)")
    label: str | None = Field(default=None, max_length=200, description="class name or index (conditional models)")
    latent: list[float] = Field(default_factory=list, max_length=MAX_LATENT_DIMS,
                                description=f"shift of the first latent dimensions, each within +-{MAX_LATENT_SHIFT:g} (GANs, VAEs)")
    directions: list[float] = Field(default_factory=list, max_length=MAX_DIRECTIONS,
                                    description="moves along the model's principal latent directions (GANSpace), "
                                                "each in [-5, 5] (GANs, VAEs)")
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="what to draw (models trained on captions)")
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS,
                                        description="what to steer away from (models trained on captions)")


def option_fields() -> dict[str, tuple]:
    """The served sampling options of every family (models.SAMPLE_OPTIONS) as optional request fields."""
    fields = {}
    for name, opt in SAMPLE_OPTIONS.items():
        if opt.served:
            kind = opt.kind if opt.range is not None else Literal[opt.choices]
            fields[name] = (kind | None, Field(default=None, **opt.bounds(), description=opt.help))
    return fields


GenerateRequest = create_model("GenerateRequest", __base__=GenerateBase, __doc__=None, **option_fields())
OPTION_FIELDS = tuple(name for name, opt in SAMPLE_OPTIONS.items() if opt.served)


class InterpolateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=MAX_NAME_CHARS)
    seed_a: int = Seed
    seed_b: int = Field(default=1, **SEED.bounds())
    frames: int = Field(default=8, ge=2, le=MAX_FRAMES)
    label: str | None = Field(default=None, max_length=200)


class AnalyseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=MAX_NAME_CHARS)
    seed: int = Seed
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    label: str | None = Field(default=None, max_length=200)


class OptionInfo(BaseModel):
    help: str
    min: float | None = None     # a number: the page's slider
    max: float | None = None
    step: float | None = None
    value: float | None = None
    choices: list[str] | None = None   # a method's name: the page's menu


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
    options: dict[str, OptionInfo]   # the family's served sampling options: their help and the page's control
    latent_dims: int
    domains: list[str]
    text: bool = False     # trained on captions: takes a prompt
    varies: bool = False   # POST /api/vary works for it (a latent space, or a denoiser to re-noise with)


class SkippedRun(BaseModel):
    name: str
    reason: str


# --- the served runs -----------------------------------------------------------------------------------

@dataclass
class Served:
    name: str
    run: Run
    about: ModelInfo | None = None   # what GET /api/models says of it, made once when it is loaded

    @property
    def model(self):
        return self.run.model

    def info(self) -> ModelInfo:
        if self.about is None:
            self.about = self.describe()
        return self.about

    def describe(self) -> ModelInfo:
        m, cfg = self.run.model, self.run.model.cfg
        return ModelInfo(
            name=self.name, family=self.run.family, classes=self.run.classes if m.conditional else [],
            conditional=m.conditional, translates=m.translates, inpaints=m.inpaints,
            image_size=cfg.image_size, channels=cfg.channels,
            step=self.run.step, data=shown_source(self.run.data_source),
            options={k: OptionInfo(**o.control()) for k, o in m.sample_options.items() if o.served},
            latent_dims=cfg.z_dim if m.has_latent else 0,
            domains=[cfg.domain_a, cfg.domain_b] if m.translates else [], text=m.reads_text,
            varies=not m.translates and (m.edits or m.has_latent))


def shown_source(source: str | None) -> str | None:
    """A data source as GET /api/models shows it to anyone who can reach the server: a path only by its last
    part ("folder:/home/me/photos" -> "folder:photos"), so that no answer spells out the machine's folders."""
    if source is None or ":" not in source:
        return source
    kind, _, rest = source.partition(":")
    return f"{kind}:{Path(rest).name}" if "/" in rest or "\\" in rest else source


def load_served(name: str, folder: Path, engine: str = "torch") -> Served:
    """The run in `folder`, served as `name`, sampling with `engine` (imagegen.runtime.engine; onnxruntime exports
    each network the first time a request needs it)."""
    run = load_run(folder, max_bytes=MAX_MODEL_BYTES)
    if run.model.autoencodes:
        raise ConfigError("an autoencoder (model 'ae') draws no images; the latent models built on it are served")
    use_engine(run.model, engine)
    for net in run.model.children():  # a request past its deadline stops at its next network call (each
        net.register_forward_pre_hook(stop_if_late)   # network, not each layer: a hook per layer cost 8-11%)
    served = Served(name, run)
    served.info()     # a run that cannot describe itself fails here, not in every GET /api/models
    return served


def find_runs(root: Path, log=print, engine: str = "torch", skipped: dict | None = None) -> dict[str, Served]:
    """Every loadable run folder at or under root, up to RUN_SEARCH_DEPTH deep, named by its path relative
    to root (root itself by its folder name). A run that fails to load for any reason is left out with a
    one-line reason, logged and put in `skipped` (name -> reason, paths relative to root): one bad folder
    never stops the others from being served."""
    folders = [root] + [p.parent for d in range(1, RUN_SEARCH_DEPTH + 1) for p in sorted(root.glob("*/" * d + "config.json"))]
    runs: dict[str, Served] = {}
    for folder in folders:
        if not (folder / "config.json").is_file():
            continue
        name = root.name if folder == root else folder.relative_to(root).as_posix()
        try:
            runs[name] = load_served(name, folder, engine)
        except Exception as e:   # noqa: BLE001 - whatever a folder holds, it costs only itself
            reason = str(e) if isinstance(e, ImagegenError) else f"{type(e).__name__}: {e}"
            reason = " ".join(reason.replace(f"{root}/", "").split())[:300]
            if skipped is not None:
                skipped[name] = reason
            if log:
                log(f"not serving {folder}: {reason}")
    return runs


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


def upload_name(upload: UploadFile, default: str) -> str:
    """The uploaded file's own name (its last part; at most 100 characters), for a reproduce command."""
    name = Path(upload.filename or "").name[:100]
    return name if name.strip(". ") else default


def decode_upload(data: bytes, what: str, channels: int, size: int | None = None) -> np.ndarray:
    """An uploaded PNG/JPEG/WebP -> H x W x channels uint8 (fitted to size x size if given), decoded
    exactly as `imagegen` decodes the same file on disk. Too many pixels (checked from the header,
    before decoding) or a decompression bomb is 413; anything unreadable is an ImageFileError (400)."""
    try:
        return decode_image(io.BytesIO(data), what, size, channels, max_pixels=MAX_UPLOAD_PIXELS)
    except ImageTooLargeError as e:
        raise bad_request(str(e), 413) from None


def options_of(req: BaseModel) -> dict:
    """The sampling options a request body gives (the fields built from models.SAMPLE_OPTIONS)."""
    return {k: getattr(req, k) for k in OPTION_FIELDS if getattr(req, k) is not None}


class Api:
    """What every route needs: the served runs, the model worker, and the checks that turn a request's
    fields into library arguments (bad ones are 4xx answers that name them)."""

    def __init__(self, runs: dict[str, Served], worker: Worker, engine: str = "torch", skipped: dict | None = None) -> None:
        self.runs, self.worker, self.engine = runs, worker, engine
        self.skipped: dict[str, str] = {} if skipped is None else skipped   # run name -> why it is not served

    def get(self, name: str) -> Served:
        if name not in self.runs:
            raise bad_request(f"unknown model {name[:MAX_NAME_CHARS]!r} (GET /api/models lists them)", 404)
        return self.runs[name]

    def labels_for(self, served: Served, label: str | None, seeds: list[int]) -> torch.Tensor | None:
        return resolve_labels(served.model, served.run.classes, label or None, seeds, what="label")

    def seed_range(self, seed: int, n: int) -> list[int]:
        if seed + n - 1 > MAX_SEED:
            raise bad_request(f"seed + n - 1 is over the largest seed {MAX_SEED}")
        return list(range(seed, seed + n))

    def steps(self, served: Served, opts: dict) -> int:
        """The network calls per image a request's options ask of the model (1 for a one-pass family)."""
        if "steps" not in served.model.sample_options:
            return 1
        if (opts.get("solver") or served.model.sampling_settings().get("solver")) == "dopri5":
            return ADAPTIVE_STEPS                     # it picks its own steps: count it as this many
        return opts.get("steps") or served.model.cfg.sample_steps

    def check_work(self, served: Served, images: int, opts: dict, pixels: int | None = None, passes: int = 1) -> None:
        """The one cost of every route that runs a network, in image-steps at the model's own size: images x
        steps x passes per step x what a canvas larger than the model's images weighs (CANVAS_EXPONENT);
        400 over MAX_WORK."""
        steps = self.steps(served, opts)
        weight = max(1.0, (pixels or 0) / served.model.cfg.image_size ** 2) ** CANVAS_EXPONENT
        work = images * steps * passes * weight
        if work > MAX_WORK:
            parts = [f"{images} images", f"{steps} steps"] + [f"{passes} passes"] * (passes > 1) + \
                    [f"a {pixels}-pixel canvas counted as {weight:g} images"] * (weight > 1)
            raise bad_request(f"{' x '.join(parts)} is over the limit of {MAX_WORK} image-steps per request")

    def generator_of(self, served: Served) -> Served:
        if served.model.translates:
            raise bad_request(f"model {served.name!r} translates images: use POST /api/translate")
        return served


def command_header(ask, served: Served) -> dict[str, str]:
    """X-Imagegen-Command: the `imagegen` command (a request's, requests.py) that gives the same pixels
    as the answer, under the engine the server runs."""
    return {"X-Imagegen-Command": latin1(ask.command(served.run.path, engine_of(served.model)))}


def latin1(text: str) -> str:
    """A header value: HTTP headers are Latin-1 without control characters, so a prompt outside Latin-1 is
    written with escapes there, and a newline or tab in it (or in a class name) as \\n or \\t."""
    text = text.encode("latin-1", "backslashreplace").decode("latin-1")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)
