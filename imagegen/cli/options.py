"""What several command groups share: numbers checked against their documented range while the
arguments are parsed, every family's sampling options as flags, the engine flag, and reading labels and
prompts from the arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Range, field_ranges
from ..runtime.engine import ENGINES
from ..errors import ConfigError
from ..models import SAMPLE_OPTIONS
from ..train import TrainConfig


def number(rng: Range):
    """An argparse type that parses a number and checks it against its documented range."""
    def parse(text: str):
        try:
            return rng.parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = rng.kind.__name__
    parse.range = rng        # for --help and the tests that sweep every numeric option
    return parse


def choice(opt, flag: str):
    """An argparse type that takes one of a sampling option's choices (its message names the flag)."""
    def parse(text: str) -> str:
        try:
            return opt.check(text, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "choice"
    return parse


def add_number(p, flag: str, rng: Range, help: str = "", **kw) -> None:
    """An option that takes a number in `rng`; --help shows the range."""
    p.add_argument(flag, type=number(rng), help=f"{help}{'; ' if help else ''}range {rng}", **kw)


TRAIN_RANGES = field_ranges(TrainConfig)

LABELS_HELP = ("class name or index for every seed, or a comma list with one per seed "
               "(see `imagegen data info`); default: seed mod number of classes")


def add_sample_options(p, only: tuple[str, ...] | None = None) -> None:
    """Every family's sampling options as flags (`--steps`, `--guidance`, `--truncation`...), offered by
    `sample`, `vary`, `inpaint`...; a run accepts only its own family's (sample.check_options)."""
    for name, opt in SAMPLE_OPTIONS.items():
        if only is None or name in only:
            if opt.range is not None:
                add_number(p, f"--{name}", opt.range, opt.help)
            else:
                p.add_argument(f"--{name}", type=choice(opt, f"--{name}"), choices=opt.choices, help=opt.help)


def add_engine(p) -> None:
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="what runs the network: torch (default) or onnxruntime, one graph, whose single images cost "
                        "little more than their share of a batch (exported on first use, seconds; needs "
                        "imagegen[export]; pixels may differ from torch's by one level)")


def given_options(a) -> dict:
    """The sampling options given as flags, unchecked (a request checks them against its run)."""
    return {k: getattr(a, k) for k in SAMPLE_OPTIONS if getattr(a, k, None) is not None}


def prompts_of(a) -> str | list[str] | None:
    """--prompt (one for every seed) or --prompts FILE (one per line, one per seed), not both."""
    if a.prompt is not None and a.prompts:
        raise ConfigError("give --prompt or --prompts FILE, not both")
    if not a.prompts:
        return a.prompt
    try:
        lines = Path(a.prompts).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--prompts {a.prompts}: cannot read it ({e})") from None
    return [line.strip() for line in lines if line.strip()]
