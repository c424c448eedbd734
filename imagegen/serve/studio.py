"""The studio's routes: variations of an image ("more like this"), breeding two, and turning a sketch into
images, over imagegen.vary (latent steps for GANs and VAEs, SDEdit for ddpm and flow). Every answer
carries the `imagegen vary` or `imagegen breed` command that gives the same pixels."""

from __future__ import annotations

import torch
from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..directions import DIRECTION, MAX_DIRECTIONS, direction_shift, principal_directions
from ..models.denoising import STRENGTH
from ..sample import SEED, generate, hwc_to_float
from ..vary import MIX, breed
from ..text import MAX_PROMPT_CHARS
from .. import requests
from .common import (MAX_NAME_CHARS, Api, GenerateRequest, bad_request, command_header, decode_upload, options_of,
                     png_response, read_upload)
from .worker import MAX_BATCH


class VaryRequest(GenerateRequest):
    """Variations for seeds seed .. seed + n - 1 of the image of seed `source` (or, with `parent`, of the
    blend of both parents' images, `mix` of the way to the second), `strength` away from it."""
    source: int = Field(default=0, **SEED.bounds(), description="the seed whose image to vary (the first parent)")
    parent: int | None = Field(default=None, **SEED.bounds(), description="breed: the second parent's seed")
    mix: float = Field(default=0.5, **MIX.bounds(), description="breed: 0 = the first parent, 1 = the second")
    strength: float = Field(default=0.5, **STRENGTH.bounds(),
                            description="how far from the source: small = close, 1 = a new image")


SKETCH_FILE = "sketch.png"   # what the page calls the sketch it offers for download, as the command does


class DirectionsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=MAX_NAME_CHARS)
    k: int = Field(default=4, ge=1, le=MAX_DIRECTIONS, description="how many directions")


class StripRequest(BaseModel):
    """A strip of images of one seed moved along one direction, from -reach to +reach."""
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=MAX_NAME_CHARS)
    index: int = Field(default=0, ge=0, lt=MAX_DIRECTIONS, description="which direction (0 = the largest)")
    seed: int = Field(default=0, **SEED.bounds())
    label: str | None = Field(default=None, max_length=200)
    frames: int = Field(default=5, ge=2, le=9)
    reach: float = Field(default=3.0, gt=0, le=DIRECTION.hi)


def variations(req: VaryRequest, seeds: list[int], image: str | None = None) -> requests.VaryRequest:
    """The library's request for a body of /api/vary (or /api/sketch, from the file `image`)."""
    sources = [] if image is not None else [req.source] + ([] if req.parent is None else [req.parent])
    return requests.VaryRequest(seeds, labels=req.label or None, prompt=req.prompt, negative_prompt=req.negative_prompt,
                                options=options_of(req), names=requests.HTTP, sources=sources, image=image,
                                strength=req.strength, mix=req.mix)


def studio_router(api: Api) -> APIRouter:
    """/api/vary (and breeding), /api/directions, /api/direction-strip, /api/sketch."""
    router = APIRouter()

    @router.post("/api/vary", response_class=Response,
                 responses={200: {"content": {"image/png": {}}, "description": "one PNG (a grid when n > 1)"}})
    async def vary_route(req: VaryRequest) -> Response:
        """Variations of a seed's image, or (with `parent`) of two seeds' blend. The header
        X-Imagegen-Command holds the matching `imagegen vary` or `imagegen breed` command."""
        served = api.generator_of(api.get(req.model))
        if req.latent or req.directions:
            raise bad_request("latent and directions do not apply to /api/vary: vary the seed whose latent you want")
        seeds = api.seed_range(req.seed, req.n)
        ask = variations(req, seeds)
        ready = ask.check(served.run)
        # the source image(s) are drawn too: up to two more images' worth of steps
        api.check_work(served, req.n + len(ask.sources), ready.options)
        images = await api.worker.call(lambda: breed(served.model, ask.sources, seeds, strength=req.strength, mix=req.mix,
                                                     labels=ready.labels, prompt=req.prompt,
                                                     negative_prompt=req.negative_prompt, batch_size=MAX_BATCH,
                                                     **ready.options))
        return png_response(images, headers=command_header(ask, served) | {"X-Imagegen-Seeds": f"{seeds[0]}-{seeds[-1]}"})

    @router.post("/api/directions")
    async def directions_route(req: DirectionsRequest) -> dict:
        """The model's k principal latent directions (GANSpace) and the share of its early features'
        variance each explains: what the page's sliders move (GANs and VAEs)."""
        served = api.generator_of(api.get(req.model))
        dirs, explained = await api.worker.call(lambda: principal_directions(served.model, req.k))
        return {"k": req.k, "explained": [round(float(v), 4) for v in explained], "z_dim": dirs.shape[1]}

    @router.post("/api/direction-strip", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def strip_route(req: StripRequest) -> Response:
        """What one slider does: the seed's image moved along direction `index`, frames from -reach to
        +reach (the middle one, at 0, is the seed's own image when frames is odd)."""
        served = api.generator_of(api.get(req.model))
        labels = api.labels_for(served, req.label, [req.seed])
        values = [-req.reach + 2 * req.reach * i / (req.frames - 1) for i in range(req.frames)]

        def work():
            rows = []
            for v in values:
                moves = [0.0] * req.index + [v]
                rows.append(generate(served.model, [req.seed], labels=labels, latent=direction_shift(served.model, moves)
                                     if v else None))
            return torch.cat(rows)
        images = await api.worker.call(work)
        return png_response(images, nrow=req.frames)

    @router.post("/api/sketch", response_class=Response,
                 responses={200: {"content": {"image/png": {}}, "description": "one PNG (a grid when n > 1)"}})
    async def sketch_route(image: UploadFile = File(...),
                           request: str = Form(..., max_length=4 * MAX_PROMPT_CHARS,
                                               description="a JSON /api/vary body; its source and parent are unused")) -> Response:
        """Images made from an uploaded drawing at the model's size (SDEdit for ddpm and flow, the
        posterior mean for VAEs), one per seed. The command in X-Imagegen-Command reads the drawing
        from sketch.png."""
        try:
            req = VaryRequest.model_validate_json(request)
        except ValidationError as e:
            lines = [f"{'.'.join(str(p) for p in err.get('loc', [])) or 'request'}: {err.get('msg', 'invalid')}" for err in e.errors()]
            raise bad_request("; ".join(lines), 422) from None
        served = api.generator_of(api.get(req.model))
        if req.latent or req.directions or req.parent is not None:
            raise bad_request("a sketch is the only source: latent, directions and parent do not apply")
        seeds = api.seed_range(req.seed, req.n)
        ask = variations(req, seeds, image=SKETCH_FILE)
        ready = ask.check(served.run)
        api.check_work(served, req.n, ready.options)
        cfg = served.model.cfg
        size = cfg.image_size
        pixels = decode_upload(await read_upload(image, "image"), "image", cfg.channels)
        if pixels.shape[:2] != (size, size):
            raise bad_request(f"image: the sketch is {pixels.shape[1]}x{pixels.shape[0]}; this model draws {size}x{size}")
        x = hwc_to_float(pixels)
        images = await api.worker.call(lambda: breed(served.model, [x], seeds, strength=req.strength, labels=ready.labels,
                                                     prompt=req.prompt, negative_prompt=req.negative_prompt,
                                                     batch_size=MAX_BATCH, **ready.options))
        return png_response(images, headers=command_header(ask, served) | {"X-Imagegen-Seeds": f"{seeds[0]}-{seeds[-1]}"})

    return router
