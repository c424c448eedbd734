"""Typed requests: what a front end asks of a run, checked once against it, and the `imagegen` command that
draws the same pixels. The command line (`imagegen sample`, `vary`, `breed`) and the server
(`POST /api/generate`, `/api/vary`, `/api/sketch`) build the same request from their own arguments and
call the library with what `check` returns; a refusal is a ConfigError that names the field as the
front end calls it (`--labels` on the command line, `label` in a JSON body).

    req = SampleRequest(seeds=[0, 1, 2], labels="sneaker", options={"steps": 2})
    ready = req.check(run)                     # labels as a tensor, options checked, ...
    images = generate(run.model, ready.seeds, labels=ready.labels, ...)
    req.command(run.path)                      # 'imagegen sample RUN --seeds 0-2 --labels sneaker --steps 2 ...'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ConfigError
from .sample import check_latent, check_options, resolve_labels
from .text import check_prompt


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
    """text as one word of a POSIX shell command line."""
    return text if text.replace("-", "").replace("_", "").isalnum() else "'" + text.replace("'", "'\\''") + "'"


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
        words = ["imagegen", "sample", str(run_path), "--seeds", seed_text(self.seeds)]
        if engine != "torch":
            words += ["--engine", engine]
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

    def command(self, run_path: str | Path, out: str = "variations/") -> str:
        """The `imagegen vary` or `imagegen breed` command that draws the same images."""
        if self.image is not None:
            words = ["imagegen", "vary", str(run_path), "--image", self.image]
        elif len(self.sources) == 1:
            words = ["imagegen", "vary", str(run_path), "--seed", str(self.sources[0])]
        else:
            words = ["imagegen", "breed", str(run_path), "--parents", ",".join(map(str, self.sources)),
                     "--mix", repr(self.mix)]
        # repr: the shortest text that parses back to the same float, so the command draws the same pixels
        words += ["--strength", repr(self.strength), "--seeds", seed_text(self.seeds)]
        return " ".join(words + _text_words(self) + option_words(self.options) + ["--out", out])


def _text_words(req: ImageRequest) -> list[str]:
    words = []
    for flag, value in (("--labels", req.labels or None), ("--prompt", req.prompt), ("--negative-prompt", req.negative_prompt)):
        if isinstance(value, str):
            words += [flag, shell_quote(value)]
    return words


__all__ = ["CLI", "HTTP", "Names", "Ready", "SampleRequest", "VaryRequest", "shell_quote", "seed_text"]
