"""TensorBoard logging (`train.logger = "tensorboard"`, `--logger tensorboard`): the training loop's
scalars, learning rates, images/s and sample grids, and `imagegen evaluate`'s metrics, as event files in
the run folder itself, so `tensorboard --logdir runs` lists every run by its folder name. log.jsonl is
written either way; this is a second view, not a replacement.

torch.utils.tensorboard's SummaryWriter writes the events (it needs the `tensorboard` package:
`pip install 'imagegen[tensorboard]'`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ConfigError

LOGGERS = ("jsonl", "tensorboard")


def check_logger(name: str) -> None:
    if name not in LOGGERS:
        raise ConfigError(f"train.logger must be one of {', '.join(LOGGERS)}, got {name!r}")


class Board:
    """One run's event writer. On resume from step s, events after s from the interrupted run are
    dropped (TensorBoard purges steps >= purge_step), so the curves do not fold back on themselves."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(f"train.logger 'tensorboard' needs the tensorboard package: "
                              f"pip install 'imagegen[tensorboard]' ({e})") from None
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=None if resume_step is None else resume_step + 1, flush_secs=30)

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)

    def image(self, step: int, tag: str, picture) -> None:
        """A PIL image (a sample grid) at `step`."""
        self.writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def log_metrics(run_dir: str | Path, step: int, metrics: dict) -> None:
    """`imagegen evaluate`'s numbers into the run's events, at the run's step (runs that log there)."""
    board = Board(run_dir)
    try:
        board.scalars(step, {k: v for k, v in metrics.items() if v is not None}, "eval")
    finally:
        board.close()
