"""Typed requests: what a front end asks of a run, checked once against it, and the `imagegen` command that
does the same. The command line and the server build the same request from their own arguments and
call the library with what `check` returns; a refusal is a ConfigError that names the field as the
front end calls it (`--labels` on the command line, `label` in a JSON body):

    request             command line                   server
    SampleRequest       imagegen sample                POST /api/generate
    VaryRequest         imagegen vary, breed           POST /api/vary, /api/sketch
    InterpolateRequest  imagegen interpolate           POST /api/interpolate
    InpaintRequest      imagegen inpaint, outpaint     POST /api/inpaint
    TranslateRequest    imagegen translate             POST /api/translate
    TrainRequest        imagegen train                 POST /api/train (the studio's training process)


    req = SampleRequest(seeds=[0, 1, 2], labels="sneaker", options={"steps": 2})
    ready = req.check(run)                     # labels as a tensor, options checked, ...
    images = generate(run.model, ready.seeds, labels=ready.labels, ...)
    req.command(run.path)                      # 'imagegen sample RUN --seeds 0-2 --labels sneaker --steps 2 ...'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import apply_overrides, load_toml
from .errors import ConfigError
from .models.denoising import RESAMPLE
from .sample import FRAMES, PAD, SIDES, check_latent, check_options, resolve_labels
from .text import check_prompt
from .train import resolve_config


@dataclass(frozen=True)
class Names:
    """How a front end calls the fields, for the messages that refuse them."""
    prefix: str          # of a sampling option: "--steps" or "steps"
    labels: str
    latent: str
    directions: str
    prompt: str
    negative_prompt: str


CLI = Names("--", "--labels", "--latent", "--directions", "--prompt", "--negative-prompt")
HTTP = Names("", "label", "latent", "directions", "prompt", "negative_prompt")


def shell_quote(text: str) -> str:
    """text as one word of a POSIX shell command line: as it is when no character means anything to a
    shell (letters, digits and _ - . / , : = + @ %), else in single quotes."""
    return text if re.fullmatch(r"[\w./,:=+@%-]+", text) else "'" + text.replace("'", "'\\''") + "'"


def engine_words(engine: str) -> list[str]:
    """--engine, when it is not the default: the engine decides the last bits of every pixel."""
    return [] if engine == "torch" else ["--engine", engine]


def seed_text(seeds: Sequence[int]) -> str:
    """'7' or '3-9': the --seeds of a run of consecutive seeds."""
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"


def option_words(options: dict[str, Any]) -> list[str]:
    """The sampling options as flags; a float as %g, which reads back as the same value."""
    words = []
    for k, v in options.items():
        words += [f"--{k}", f"{v:g}" if isinstance(v, float) else str(v)]
    return words


@dataclass
class ImageRequest:
    """What every request for images from a run shares: one image per seed, the class labels (names or
    indices as text: one, or a comma list with one per seed), the prompts of a text model and the
    family's sampling options."""
    seeds: list[int]
    labels: str | None = None
    prompt: str | list[str] | None = None
    negative_prompt: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    names: Names = CLI

    def _options(self, run) -> dict:
        if not self.seeds:
            raise ConfigError("no seeds given: one image is drawn per seed")
        return check_options(run.model, self.options, prefix=self.names.prefix)

    def _prompts(self, run) -> None:
        for name, text in ((self.names.prompt, self.prompt), (self.names.negative_prompt, self.negative_prompt)):
            if text is None:
                continue
            if not run.model.reads_text:
                raise ConfigError(f"this {run.model.name} model was not trained on captions: it takes no {name}")
            for one in [text] if isinstance(text, str) else text:
                check_prompt(one, name)


@dataclass
class Ready:
    """A request checked against its run: the library's arguments."""
    seeds: list[int]
    labels: torch.Tensor | None
    options: dict[str, Any]
    latent: list[float] | None = None


@dataclass
class SampleRequest(ImageRequest):
    """Images from noise, one per seed (`imagegen sample`, POST /api/generate): optionally a shift of the
    first latent dimensions (`latent`) or moves along the principal directions (`directions`), GANs and
    VAEs."""
    latent: list[float] = field(default_factory=list)
    directions: list[float] = field(default_factory=list)

    def check(self, run) -> Ready:
        """The library's arguments; the directions are turned into a latent shift by the caller
        (directions.direction_shift: it runs the model), after this check."""
        options = self._options(run)
        labels = resolve_labels(run.model, run.classes, self.labels, self.seeds, what=self.names.labels)
        latent = check_latent(run.model, self.latent) if self.latent else None
        if self.directions and latent:
            raise ConfigError(f"give {self.names.latent} or {self.names.directions}, not both")
        self._prompts(run)
        return Ready(list(self.seeds), labels, options, latent)

    def command(self, run_path: str | Path, engine: str = "torch", out: str = "samples/") -> str:
        """The `imagegen sample` command that draws the same images."""
        words = ["imagegen", "sample", str(run_path), "--seeds", seed_text(self.seeds), *engine_words(engine)]
        words += _text_words(self)
        if self.directions:
            words += ["--directions", ",".join(repr(float(v)) for v in self.directions)]
        elif self.latent:
            words += ["--latent", ",".join(f"{v:g}" for v in self.latent)]
        return " ".join(words + option_words(self.options) + ["--out", out])


@dataclass
class VaryRequest(ImageRequest):
    """Variations, one per seed, of a source: the image of seed `sources[0]`, the blend of two seeds'
    images `mix` of the way to the second (breeding), or a file (`image`: its name in the command),
    `strength` away from it (`imagegen vary`, `imagegen breed`, POST /api/vary and /api/sketch). The
    labels, when given, are one class for every image."""
    sources: list[int] = field(default_factory=list)
    image: str | None = None
    strength: float = 0.5
    mix: float = 0.5

    def check(self, run) -> Ready:
        options = self._options(run)
        if self.image is None and len(self.sources) not in (1, 2):
            raise ConfigError(f"vary takes one source seed and breed two, got {len(self.sources)}")
        first = self.sources[:1] or [0]
        labels = (resolve_labels(run.model, run.classes, self.labels, first, what=self.names.labels)
                  if self.labels else None)
        self._prompts(run)
        return Ready(list(self.seeds), labels, options)

    def command(self, run_path: str | Path, engine: str = "torch", out: str = "variations/") -> str:
        """The `imagegen vary` or `imagegen breed` command that draws the same images."""
        if self.image is not None:
            words = ["imagegen", "vary", str(run_path), "--image", shell_quote(self.image)]
        elif len(self.sources) == 1:
            words = ["imagegen", "vary", str(run_path), "--seed", str(self.sources[0])]
        else:
            words = ["imagegen", "breed", str(run_path), "--parents", ",".join(map(str, self.sources)),
                     "--mix", repr(self.mix)]
        # repr: the shortest text that parses back to the same float, so the command draws the same pixels
        words += ["--strength", repr(self.strength), "--seeds", seed_text(self.seeds)]
        return " ".join(words + _text_words(self) + option_words(self.options) + engine_words(engine) + ["--out", out])


@dataclass
class InterpolateRequest:
    """A strip of `frames` images through latent space between two seeds, or between the latents of two
    image files (`images`, their names; families with an encoder), every frame of one class."""
    seeds: list[int] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    frames: int = 8
    labels: str | None = None
    names: Names = CLI

    def check(self, run) -> Ready:
        if self.images:
            if len(self.images) != 2 or self.seeds:
                raise ConfigError("interpolate takes exactly two image files like a.png,b.png (and no seeds)")
        elif len(self.seeds) != 2:
            raise ConfigError(f"interpolate takes exactly two seeds like 3,9, got {len(self.seeds)}")
        FRAMES.check(self.frames, self.names.prefix + "frames")
        labels = resolve_labels(run.model, run.classes, self.labels, self.seeds[:1] or [0], what=self.names.labels)
        return Ready(list(self.seeds), labels, {})

    def command(self, run_path: str | Path, engine: str = "torch", out: str = "strip.png") -> str:
        """The `imagegen interpolate` command that draws the same strip."""
        ends = ["--images", ",".join(map(shell_quote, self.images))] if self.images else [
            "--seeds", ",".join(map(str, self.seeds))]
        labels = ["--labels", shell_quote(self.labels)] if self.labels else []
        return " ".join(["imagegen", "interpolate", str(run_path), *ends, *labels, "--frames", str(self.frames),
                         *engine_words(engine), "--out", out])


@dataclass
class InpaintRequest(ImageRequest):
    """New pixels for the white pixels of a mask in an image (`mask`, the mask file's name), or around an
    image extended by `pad` pixels on `sides` (no mask: outpainting), from one seed; the known pixels are
    kept exactly. `image` names the image file; `resample` is RePaint's passes per step (diffusion)."""
    image: str = "image.png"
    mask: str | None = None
    pad: int = 8
    sides: list[str] = field(default_factory=lambda: list(SIDES))
    resample: int | None = None

    OPTIONS = ("steps", "guidance")   # the sampling options inpainting takes

    def check(self, run) -> Ready:
        if not run.model.inpaints:
            raise ConfigError(f"a {run.model.name} model cannot inpaint or outpaint (a ddpm, flow or consistency run "
                              "can, and a vae or cvae run can inpaint)")
        if len(self.seeds) != 1:
            raise ConfigError(f"inpainting draws from one seed, got {len(self.seeds)}")
        other = [self.names.prefix + k for k in self.options if k not in self.OPTIONS]
        if other:
            raise ConfigError(f"inpainting takes no {', '.join(other)}")
        options = self._options(run)
        if self.resample is not None:
            RESAMPLE.check(self.resample, self.names.prefix + "resample")
            options["resample"] = self.resample
        if self.mask is None:
            PAD.check(self.pad, self.names.prefix + "pad")
            unknown = [s for s in self.sides if s not in SIDES]
            if unknown or not self.sides:
                raise ConfigError(f"{self.names.prefix}sides: a comma list of {', '.join(SIDES)}, got {','.join(self.sides)!r}")
        labels = resolve_labels(run.model, run.classes, self.labels, self.seeds, what=self.names.labels)
        self._prompts(run)
        return Ready(list(self.seeds), labels, options)

    def command(self, run_path: str | Path, engine: str = "torch", out: str = "inpainted.png") -> str:
        """The `imagegen inpaint` or `imagegen outpaint` command that draws the same pixels."""
        words = ["imagegen", "inpaint" if self.mask else "outpaint", str(run_path), "--image", shell_quote(self.image)]
        words += (["--mask", shell_quote(self.mask)] if self.mask else
                  ["--pad", str(self.pad), "--sides", ",".join(self.sides)])
        words += ["--seed", str(self.seeds[0])] + _text_words(self) + option_words(self.options)
        words += ["--resample", str(self.resample)] if self.resample is not None else []
        return " ".join(words + engine_words(engine) + ["--out", out])


@dataclass
class TranslateRequest:
    """Images (`input`: a file or a folder's name) translated to the other domain by a cyclegan run."""
    input: str
    direction: str = "a2b"

    def check(self, run) -> None:
        if not run.model.translates:
            raise ConfigError(f"{run.path} is a {run.family} model, which draws images from seeds: use "
                              "`imagegen sample` (translation needs a cyclegan run)")
        if self.direction not in ("a2b", "b2a"):
            raise ConfigError(f"direction must be a2b or b2a, got {self.direction!r}")

    def command(self, run_path: str | Path, engine: str = "torch", out: str = "translated/") -> str:
        """The `imagegen translate` command that gives the same images."""
        return " ".join(["imagegen", "translate", str(run_path), "--direction", self.direction,
                         "--input", shell_quote(self.input), *engine_words(engine), "--out", out])


@dataclass
class TrainRequest:
    """A new training run: a family (`model`) on a data source, with a TOML file of overrides (`config`),
    the train flags (`flags`: steps, batch_size, seed, device, precision, logger) and KEY=VALUE overrides
    (`sets`), applied in that order. `check` resolves the config, so that an unknown key, family or value
    is refused before anything trains; `command` is the `imagegen train` command line as words."""
    model: str | None = None
    data: str | None = None
    config: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    strict: bool = False

    FLAGS = {"steps": "train.steps", "batch_size": "train.batch_size", "seed": "train.seed",
             "device": "train.device", "precision": "train.precision", "logger": "train.logger"}

    def check(self):
        """The resolved TrainConfig (train.resolve_config: unknown keys are errors)."""
        unknown = sorted(set(self.flags) - set(self.FLAGS))
        if unknown:
            raise ConfigError(f"train has no flag {', '.join(unknown)}")
        tree = load_toml(self.config) if self.config else {}
        if self.model:
            tree["family"] = self.model
        flags = [f"data.source={json.dumps(self.data)}"] if self.data is not None else []
        flags += [f"{self.FLAGS[k]}={json.dumps(v)}" for k, v in self.flags.items() if v is not None]
        apply_overrides(tree, flags + (["data.strict=true"] if self.strict else []) + list(self.sets))
        return resolve_config(tree)

    def command(self, out: str = "runs") -> list[str]:
        words = ["imagegen", "train"]
        for flag, value in (("--data", self.data), ("--model", self.model), ("--config", self.config)):
            words += [flag, value] if value is not None else []
        for k, v in self.flags.items():
            words += [f"--{k.replace('_', '-')}", str(v)] if v is not None else []
        for s in self.sets:
            words += ["--set", s]
        return words + (["--strict"] if self.strict else []) + ["--out", str(out)]


def _text_words(req: ImageRequest) -> list[str]:
    words = []
    for flag, value in (("--labels", req.labels or None), ("--prompt", req.prompt), ("--negative-prompt", req.negative_prompt)):
        if isinstance(value, str):
            words += [flag, shell_quote(value)]
    return words


__all__ = ["CLI", "HTTP", "InpaintRequest", "InterpolateRequest", "Names", "Ready", "SampleRequest", "TrainRequest",
           "TranslateRequest", "VaryRequest", "shell_quote", "seed_text"]
