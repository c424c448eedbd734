"""What a training run shows and writes as it goes (rank 0 only): the progress bar, log.jsonl and
TensorBoard every train.log_every steps, sample grids from fixed seeds, and checkpoints. The loop in
train.py decides when; this module how. `tc` is the run's TrainConfig (train.py, which imports this)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .data import load_data
from .data.dataset import mix_seed
from .errors import ConfigError
from .sample import grid, preview
from .tboard import Board

VAL_IMAGES = 256   # held-out images the validation loss is measured on (the first of the test split)


class Validation:
    """The validation loss of a run: the family's own objective (`validation_loss`, families that declare
    `validates`) on the first VAL_IMAGES of the data's held-out test split, with the EMA weights, its noise,
    times and other draws from one fixed seed, so every check sees the same draws and the curve moves
    only with the weights. None is measured where the data has no held-out split (a folder's test split
    is its training images unless data.held_out sets one apart), the run was handed its data (the
    studio), or the family has no objective."""

    def __init__(self, cfg, ds, model, device: torch.device, main: bool, given: bool, log) -> None:
        self.batch, self.every, self.patience = None, cfg.train.val_every, cfg.train.patience
        # train.patience's counters: the lowest loss so far, its step, and the validations since
        self.best, self.best_step, self.since = None, 0, 0
        if main and model.validates and self.every and not given:
            self.batch = self._held_out(cfg, ds, model, device, log)
        if main and self.patience and self.batch is None:
            raise ConfigError("train.patience stops on the validation loss, which this run would not have: it needs "
                              "held-out images (a folder has them with data.held_out), a family that has one "
                              "(flow, ddpm, vae, ae) and "
                              "train.val_every > 0")
        self.seed = mix_seed(cfg.train.seed, 0x7A1)

    @staticmethod
    def _held_out(cfg, ds, model, device: torch.device, log) -> dict[str, torch.Tensor] | None:
        held = load_data(replace(cfg.data, split="test", limit=VAL_IMAGES))
        if held.images.shape == ds.images[:len(held)].shape and torch.equal(held.images, ds.images[:len(held)]):
            return None   # the "test" split is the training images: no held-out data
        model.ready(held, log)
        channels_last = cfg.train.channels_last
        return {k: v.to(device).contiguous(memory_format=torch.channels_last)
                if channels_last and v.ndim == 4 else v.to(device) for k, v in held.batch(torch.arange(len(held))).items()}

    def restore(self, saved: dict) -> None:
        """The counters of the checkpoint a run resumes from, so that it stops where the straight run does."""
        self.best, self.best_step, self.since = saved.get("val_best"), saved.get("val_best_step", 0), saved.get("val_since", 0)

    def due(self, done: int, last: bool) -> bool:
        return self.batch is not None and (last or done % self.every == 0)

    def loss(self, ema) -> float:
        gen = torch.Generator(next(iter(self.batch.values())).device).manual_seed(self.seed)
        return ema.validation_loss(self.batch, gen)

    def stalled(self, step: int, loss: float | None) -> bool:
        """Counts a validation loss measured at `step` (None: none measured); whether train.patience of
        them in a row have now stayed at or above the lowest."""
        if loss is None:
            return False
        if self.best is None or loss < self.best:
            self.best, self.best_step, self.since = loss, step, 0
        else:
            self.since += 1
        return bool(self.patience) and self.since >= self.patience

    def stopped(self, step: int) -> str:
        return (f"stopped at step {step}: {self.since} validations without a loss below {self.best:.4g} (step "
                f"{self.best_step}); the same command with --steps {self.best_step} gives that step's weights")

    def state(self) -> dict:
        return {"val_best": self.best, "val_best_step": self.best_step, "val_since": self.since} if self.best is not None else {}


def progress_bar(tc, start: int, progress: bool) -> tqdm:
    """The training bar: steps out of train.steps, or, under a time budget (train.time_limit), seconds out
    of it, since such runs are usually given far more steps than they will make (`--steps 1000000`), and
    a bar over those would show an ETA of days."""
    if tc.time_limit:
        return tqdm(total=tc.time_limit, disable=not progress, unit="s", desc="time budget", dynamic_ncols=True,
                    mininterval=1.0, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
                                                "[{elapsed}<{remaining}{postfix}]")
    return tqdm(total=tc.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True, mininterval=1.0)


def advance(bar: tqdm, tc, elapsed: float) -> None:
    """Move the bar one step on, or to `elapsed` seconds of the time budget (the bar ends full either way
    when the run ends early)."""
    if tc.time_limit:
        bar.update(min(elapsed, tc.time_limit) - bar.n)
    else:
        bar.update(1)


@dataclass
class Window:
    """The losses, seconds and images of the steps since the last log line."""
    losses: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    images: int = 0

    def add(self, losses: dict[str, float], seconds: float, images: int) -> None:
        self.seconds += seconds
        self.images += images
        for k, v in losses.items():
            self.losses.setdefault(k, []).append(v)

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.losses.items()}


class RunWriter:
    """Rank 0's outputs of a run (every method does nothing on the other ranks, but `close`)."""

    def __init__(self, run_dir: Path, tc, main: bool, start: int, resumed: bool, progress: bool, ds, ema,
                 opts: dict, scaler) -> None:
        self.run_dir, self.tc, self.main, self.ds, self.ema, self.opts, self.scaler = run_dir, tc, main, ds, ema, opts, scaler
        if main and resumed:
            ckpt.trim_log(run_dir / "log.jsonl", start)
        self.log_file = (run_dir / "log.jsonl").open("a") if main else None
        self.board = (Board(run_dir, resume_step=start if resumed else None)
                      if main and tc.logger == "tensorboard" else None)
        self.bar = progress_bar(tc, start, progress)

    def advance(self, elapsed: float) -> None:
        advance(self.bar, self.tc, elapsed)

    def log(self, done: int, window: Window, bad_total: int, val_loss: float | None = None) -> None:
        """One line of log.jsonl (and TensorBoard's scalars) for the window, and the bar's figures; with the
        validation loss of the step where one was measured (Validation)."""
        if not self.main:
            return
        means = window.means()
        record = {"step": done, "images_per_s": window.images / max(window.seconds, 1e-9), "bad_steps": bad_total, **means}
        if val_loss is not None:
            record["val_loss"] = val_loss
        if self.scaler is not None:
            record["fp16_scale"] = self.scaler.get_scale()
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if self.board is not None:
            self.board.scalars(done, means | ({} if val_loss is None else {"validation": val_loss}), "loss")
            self.board.scalars(done, {"images_per_s": record["images_per_s"], "bad_steps": bad_total}, "train")
            self.board.scalars(done, {k: o.param_groups[0]["lr"] for k, o in self.opts.items()}, "lr")
        self.bar.set_postfix({**({"step": done} if self.tc.time_limit else {}), **{k: f"{v:.3f}" for k, v in means.items()},
                              "img/s": f"{record['images_per_s']:.0f}"})

    def grid(self, step: int) -> None:
        """The EMA model's grid from fixed seeds, written atomically: the page's training panel serves the
        newest grid while the job runs."""
        if not self.main:
            return
        images, per_row = preview(self.ema, self.ds, self.tc.grid_size)
        picture = grid(images, nrow=per_row, scale=2 if images.shape[-1] < 48 else 1)
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        ckpt.write_bytes_atomic(self.run_dir / "samples" / f"step-{step:07d}.png", buf.getvalue())
        if self.board is not None:
            self.board.image(step, "samples", picture)

    def save(self, step: int, model: torch.nn.Module, counters: dict) -> None:
        """A checkpoint with the run's counters (bad steps, the validation's lowest loss) for resume."""
        if self.main:
            ckpt.save_checkpoint(self.run_dir, step, model.state_dict(), self.ema.state_dict(),
                                 {k: o.opt.state_dict() for k, o in self.opts.items()},
                                 counters, keep=self.tc.keep_checkpoints)

    def close(self) -> None:
        self.bar.close()
        if self.log_file is not None:
            self.log_file.close()
        if self.board is not None:
            self.board.close()
