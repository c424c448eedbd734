"""The one training loop. It never names a model family: the family owns its updates (train_step);
the loop owns seeding, device, the non-finite guard, EMA, progress, logs, sample grids, checkpoints
and resume.

Reproducibility: the batch for step s depends only on (seed, s) (data/dataset.py), and train_step gets
a generator seeded from (seed, s). So 10 steps + resume to 20 equals 20 steps straight, bit for bit,
without saving any RNG state.

Scale: launched by torchrun, every process runs this loop on its shard of each batch, with gradients
averaged over processes in the optimizer step (distributed.py). train.precision picks autocast (bf16,
or fp16 with a gradient scaler on CUDA); train.channels_last the memory format.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import MAX_BATCH, MAX_COUNT, MAX_SEED, from_dict, ranged, to_dict, validate
from .data import DataConfig, ImageDataset, load_data
from .data.dataset import mix_seed
from .errors import CheckpointError, ConfigError, TrainingError
from .models import Family, family_class
from .progress import RunWriter, Validation, Window
from .runtime.host import keep_freed_memory
from .tboard import check_logger
from .version import __version__


@dataclass
class TrainConfig:
    """The [train] table. Numbers carry their documented range (`ranged`), checked before anything is built."""
    steps: int = ranged(1600, 1, MAX_COUNT)       # total optimisation steps (a GAN step updates D then G)
    batch_size: int = ranged(64, 1, MAX_BATCH)    # images per step, over all processes of a distributed run
    seed: int = ranged(0, 0, MAX_SEED)            # the run seed: data order, initial weights, every step's noise
    device: str = "auto"          # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    channels_last: bool = True    # NHWC activations: faster convolutions on CPU (oneDNN) and tensor cores
    threads: int = ranged(0, 1, 1024, zero="torch's default: all cores")   # torch CPU threads
    ema_decay: float = ranged(0.995, 0.0, 1.0, hi_open=True)   # EMA of the weights; sampling uses them
    log_every: int = ranged(25, 1, MAX_COUNT)      # steps between lines of log.jsonl (and TensorBoard points)
    sample_every: int = ranged(400, 1, MAX_COUNT, zero="only at the end")   # sample grid from fixed seeds
    # steps between validation losses on held-out images (families that have one; at a log line, so a
    # multiple of log_every), and at the end
    val_every: int = ranged(500, 1, MAX_COUNT, zero="never")
    # Early stopping: end the run, saved, once this many validations in a row have not gone below the
    # lowest validation loss so far (small data is learned by heart; the loss turns up where it starts)
    patience: int = ranged(0, 1, MAX_COUNT, zero="never")
    grid_size: int = ranged(64, 1, 1024)           # images in each sample grid
    checkpoint_every: int = ranged(1000, 1, MAX_COUNT)   # and always at the end of a run
    keep_checkpoints: int = ranged(3, 1, 1000)     # the newest this many are kept
    max_bad_steps: int = ranged(10, 1, MAX_COUNT)        # stop after this many non-finite steps in a row
    time_limit: float = ranged(0.0, 0.0, 1e9)   # seconds of training, then the run ends, saved (0 = none)
    precision: str = "auto"       # auto (bf16 on CUDA GPUs that have it, else fp32), fp32, bf16, fp16 (CUDA)
    logger: str = "jsonl"         # jsonl (log.jsonl only), or tensorboard (events in the run folder too: tboard.py)

    def validate(self) -> None:
        check_logger(self.logger)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")


@dataclass
class RunConfig:
    family: str
    model: Any                      # the family's Config dataclass
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_json(self) -> dict:
        return {"family": self.family, "model": to_dict(self.model), "data": to_dict(self.data),
                "train": to_dict(self.train)}


def resolve_config(tree: dict) -> RunConfig:
    """A RunConfig from a nested dict of overrides: {"family": ..., "model": {...}, "data": {...}, "train": {...}}."""
    tree = dict(tree)
    family = tree.pop("family", None)
    if not family:
        raise ConfigError("no model family given (--model NAME)")
    cls = family_class(family)
    unknown = sorted(set(tree) - {"model", "data", "train"})
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r} (known: family, model, data, train)")
    for section in ("model", "data", "train"):
        if not isinstance(tree.get(section, {}), dict):
            raise ConfigError(f"config section {section!r} must be a table")
    return RunConfig(
        family=family,
        model=from_dict(cls.Config, tree.get("model"), "model"),
        data=from_dict(DataConfig, tree.get("data"), "data"),
        train=from_dict(TrainConfig, {**cls.train_defaults, **tree.get("train", {})}, "train"),
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device {name!r} is not a device name") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device {name!r}: CUDA is not available on this machine")
    return dev


def fit_model_to_data(cfg: RunConfig, ds: ImageDataset) -> RunConfig:
    """The model's image size, channels and classes come from the data, whatever the config said."""
    return replace(cfg, model=validate(family_class(cfg.family).fit_config(cfg.model, ds)))


class GuardedOptimizer:
    """Passes calls through to an optimizer; its `step()` first averages the gradients over the ranks
    of a distributed run, unscales them under fp16's gradient scaler, and skips the update when any
    gradient is NaN or Inf, so a bad batch can never write a non-finite value into the weights or the
    Adam moments. (Under fp16, an overflow is the scaler's normal way to find its scale: it is counted
    in `overflows`, not as a bad step.)"""

    def __init__(self, opt: torch.optim.Optimizer, dist: distributed.Dist | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.opt = opt
        self.dist = dist
        self.scaler = scaler
        self.skipped = 0
        self.overflows = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        grads = [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        distributed.average_gradients(grads, self.dist)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        finite = all_finite(grads)
        if finite:
            self.opt.step()
        elif self.scaler is not None:
            self.overflows += 1
        else:
            self.skipped += 1
        if self.scaler is not None:
            self.scaler.update()          # one update per optimizer step: halves the scale after an overflow

    def __getattr__(self, name: str):
        return getattr(self.opt, name)


def match_param_layouts(opt: torch.optim.Optimizer) -> None:
    """Give each state tensor of `opt` (Adam's moments) its parameter's memory layout, as a fresh
    optimizer has it (zeros_like). State read from a checkpoint comes back contiguous while channels-last
    weights are not, and fused Adam walks parameter, gradient and moments as flat memory: without this,
    a resumed run would pair the wrong elements (caught by the bit-exact resume tests)."""
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """No NaN or Inf in any tensor. max |x| is non-finite exactly when some x is; on the CPU that is 4x
    faster than torch's inf-norm (get_total_norm), which one fused kernel per device beats on a GPU."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    if tensors[0].device.type != "cpu":
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf)))
    return bool(torch.stack([t.abs().amax() for t in tensors]).isfinite().all())


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device).manual_seed(mix_seed(seed, step))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.precision on this device; None = fp32 (no autocast)."""
    if precision == "auto":
        # bf16 where the hardware runs it natively (recent CUDA GPUs); fp32 on CPUs, where bf16 autocast
        # helps only on chips with AMX/AVX512-BF16 (ask for it with --precision bf16).
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision 'fp16' needs a CUDA device; use 'bf16' on CPUs")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train(cfg: RunConfig, *, out: str | Path = "runs", resume: str | Path | None = None,
          progress: bool = True, dataset: ImageDataset | None = None,
          on_end: Callable[[Family, Family], None] | None = None) -> Path:
    """Train `cfg` into a new run folder under `out`, or continue a run up to cfg.train.steps. Returns
    the run folder. `resume` is that run's folder, "auto" (the newest run in `out` that holds a checkpoint
    of this config, else a new one: find_resumable), or "never" (always a new folder). None means "auto"
    under torchrun's elastic agent, so that the workers it restarts continue the run they were writing,
    and "never" otherwise.

    Launched by torchrun, every rank runs this same function (see distributed.py): rank 0 alone writes
    files and shows progress. `on_end(model, ema)` is called on every rank after the last step."""
    if resume is None:
        resume = "auto" if distributed.elastic_job() is not None else "never"
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    keep_freed_memory()
    device = pick_device(tc.device)
    _, world, local_rank = distributed.from_env()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)          # one GPU per process
        torch.cuda.set_device(device)
    amp_dtype = autocast_dtype(tc.precision, device)
    d = distributed.setup(device)
    main = d is None or d.main
    try:
        return _train(cfg, d, main, device, amp_dtype, out=out, resume=resume, progress=progress and main,
                      dataset=dataset, on_end=on_end)
    finally:
        distributed.teardown(d)


def _train(cfg: RunConfig, d: distributed.Dist | None, main: bool, device: torch.device, amp_dtype: torch.dtype | None,
           *, out, resume, progress: bool, dataset, on_end) -> Path:
    tc = cfg.train
    if d is not None and tc.batch_size % d.world:
        raise ConfigError(f"train.batch_size {tc.batch_size} is the global batch: it must divide evenly over "
                          f"{d.world} processes")
    ds = _training_data(cfg, dataset, main)
    cfg = fit_model_to_data(cfg, ds)     # the model's size, channels and classes follow the data
    model, ema, opts = _build(cfg, ds, device, d, amp_dtype, main)
    validation = Validation(cfg, ds, ema, device, main, dataset is not None, tqdm.write)
    run_dir, start, saved, started = _open_run(cfg, ds, model, ema, opts, d, device, main, out, resume)
    if start >= tc.steps:     # --resume auto found the run finished (a worker died after its last checkpoint)
        return run_dir
    bad_total = int(saved.get("bad_steps_total", 0))
    validation.restore(saved)
    steps = Steps(model, ema, opts, ds, cfg.train, d, device, amp_dtype)
    writer = RunWriter(run_dir, tc, main, start, start > 0, progress, ds, ema, opts, model.grad_scaler)
    window, bad_in_a_row = Window(), 0
    try:
        model.train()
        for step in range(start, tc.steps):
            losses, bad, seconds = steps.update(step)
            if bad:
                bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
                if bad_in_a_row >= tc.max_bad_steps:
                    raise TrainingError(
                        f"stopped at step {step + 1}: {bad_in_a_row} steps in a row had a non-finite loss or "
                        f"gradient (last losses {losses}); lower the learning rate or check the data"
                    )
            else:
                bad_in_a_row = 0
            window.add(losses, seconds, tc.batch_size)

            # Logs, grids and checkpoints (rank 0).
            done = step + 1
            writer.advance(time.perf_counter() - started)
            # A time budget ends the run at this step, with the log, grid and checkpoint of a normal end
            # (in a distributed run, when any rank's clock says so: ranks must stop at the same step).
            over = bool(tc.time_limit and time.perf_counter() - started >= tc.time_limit)
            if d is not None and tc.time_limit:
                over = distributed.average_values({"over": float(over)}, d, device)["over"] > 0
            last = done == tc.steps or over
            logged = done % tc.log_every == 0 or last
            val = validation.loss(ema) if logged and validation.due(done, last) else None
            stalled = validation.stalled(done, val)   # train.patience validations without a new lowest loss
            if d is not None and tc.patience:
                stalled = distributed.average_values({"stalled": float(stalled)}, d, device)["stalled"] > 0
            if stalled and not last:
                last = logged = True
                if main:
                    tqdm.write(validation.stopped(done))
            if logged:
                writer.log(done, window, bad_total, val)
                window = Window()
            if (tc.sample_every and done % tc.sample_every == 0) or last:
                writer.grid(done)
            if done % tc.checkpoint_every == 0 or last:
                # Every rank must hold the same weights; a mismatch is a bug worth stopping for.
                if not distributed.same_everywhere(steps.params + steps.buffers, d):
                    raise TrainingError(f"step {done}: the ranks' weights differ (they should be bit-identical)")
                writer.save(done, model, {"bad_steps_total": bad_total, **validation.state()})
            if last:
                break
        if on_end is not None:
            on_end(model, ema)
    finally:
        writer.close()
    return run_dir


def _training_data(cfg: RunConfig, dataset: ImageDataset | None, main: bool) -> ImageDataset:
    """The data, held in memory (or the dataset given), its skipped files and notes reported by rank 0."""
    ds = dataset if dataset is not None else load_data(cfg.data)
    if main:
        for path, reason in ds.skipped:
            tqdm.write(f"skipped {path}: {reason}")
        for note in ds.notes:
            tqdm.write(f"note: {note}")
    return ds


def _build(cfg: RunConfig, ds: ImageDataset, device: torch.device, d: distributed.Dist | None,
           amp_dtype: torch.dtype | None, main: bool) -> tuple[Family, Family, dict[str, GuardedOptimizer]]:
    """(the model, its EMA copy, its guarded optimizers): the model built under the run seed without
    touching the global RNG, moved to the device in the run's memory format."""
    tc = cfg.train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        model: Family = family_class(cfg.family)(cfg.model)
    model.ready(ds, log=tqdm.write if main else lambda *_: None)   # e.g. caption embeddings, cached latents
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    model.grad_scaler = scaler
    opts = {k: GuardedOptimizer(o, d, scaler) for k, o in model.configure_optimizers(tc).items()}
    return model, ema, opts


def _open_run(cfg: RunConfig, ds: ImageDataset, model: Family, ema: Family, opts: dict[str, GuardedOptimizer],
              d: distributed.Dist | None, device: torch.device, main: bool, out, resume) -> tuple[Path, int, dict, float]:
    """(run folder, first step, the resumed checkpoint's saved counters ({} for a new run), the time the
    clock of train.time_limit starts): a new folder (chosen by rank 0: _choose_run) after the family's
    `prepare`, or the one resumed, with its weights, EMA, optimizers and step restored. Rank 0 writes its
    config.json, unless the run is already at cfg.train.steps (then the first step is that step)."""
    tc = cfg.train
    start, saved = 0, {}
    run_dir, continues = _choose_run(cfg, d, device, main, out, resume)
    if continues:
        found = ckpt.list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"{run_dir}: no checkpoint to resume from")
        state = ckpt.load_checkpoint(found[-1])
        start, saved = int(state["state"]["step"]), state["state"]
        if start >= tc.steps:
            if resume != "auto":
                raise ConfigError(f"{run_dir} is already at step {start}; ask for more with --steps N > {start}")
            if main:
                tqdm.write(f"{run_dir} is already at step {start} (--resume auto): nothing to train")
            return run_dir, start, saved, time.perf_counter()
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        for name, sd in state["optimizers"].items():
            opts[name].opt.load_state_dict(sd)
            match_param_layouts(opts[name].opt)
        started = time.perf_counter()
    else:
        started = time.perf_counter()   # what prepare() fits counts against train.time_limit too
        model.prepare(ds, steps=tc.steps)
        ema.load_state_dict(model.state_dict())  # what prepare() computed (buffers) goes into the EMA copy too
        if run_dir is None:    # a new folder, made once prepare() has worked
            run_dir = ckpt.new_run_dir(Path(out), cfg.data.source, cfg.family) if main else None
            run_dir = Path(distributed.broadcast_text(str(run_dir), d, device))
    if main:
        (run_dir / "samples").mkdir(exist_ok=True)
        job = distributed.elastic_job()
        ckpt.write_json_atomic(run_dir / "config.json", {**cfg.to_json(), "classes": ds.classes, "data_source": ds.source,
                                                          "imagegen_version": __version__,
                                                          **({"world_size": d.world} if d else {}),
                                                          **({"elastic_job": job} if job else {})})
    return run_dir, start, saved, started


# What a continued run may change: how long and how to run it, never what is trained.
MAY_CHANGE_ON_RESUME = ("steps", "device", "precision", "logger")


def same_run(saved: dict, now: dict) -> bool:
    """Whether the config.json `saved` (checkpoint.read_config) trains what `now` (a fitted RunConfig's
    to_json, through JSON: tuples as lists, as config.json holds them) trains."""
    def what(train: dict) -> dict:
        return {k: v for k, v in train.items() if k not in MAY_CHANGE_ON_RESUME}
    return (all(saved.get(k) == now[k] for k in ("family", "model", "data"))
            and what(saved.get("train", {})) == what(now["train"]))


def find_resumable(out: Path, cfg: RunConfig, job: str | None) -> tuple[Path | None, bool]:
    """The run `--resume auto` continues, as (folder, whether it holds a checkpoint), or (None, False):
    - the folder this torchrun job (`job`, its elastic run id) made before a worker died and the agent
      restarted them all: continued from its checkpoint, or started over in it when it has none;
    - else the newest run folder in `out` holding a checkpoint of this config (same_run).
    A folder without a checkpoint from anyone else is never chosen: it may be another job's, just started."""
    newest, now = None, json.loads(json.dumps(cfg.to_json()))
    for run_dir in ckpt.run_folders(out):
        try:
            saved = ckpt.read_config(run_dir)
        except CheckpointError:
            continue
        if not same_run(saved, now):
            continue
        has_checkpoint = bool(ckpt.list_checkpoints(run_dir))
        if job and saved.get("elastic_job") == job:
            return run_dir, has_checkpoint
        if has_checkpoint and newest is None:
            newest = run_dir
    return newest, newest is not None


def _choose_run(cfg: RunConfig, d: distributed.Dist | None, device: torch.device, main: bool, out,
                resume) -> tuple[Path | None, bool]:
    """(the run folder, None for a new one; whether it continues from a checkpoint). Under "auto" rank 0
    chooses (and empties a folder to start over in); the other ranks take its answer, so every rank
    continues the same run whatever it would have seen in `out` (rank 0 may be writing there)."""
    if resume == "never":
        return None, False
    if resume != "auto":
        return Path(resume), True
    choice = ""
    if main:
        found, continues = find_resumable(Path(out), cfg, distributed.elastic_job())
        if found is not None and not continues:
            ckpt.start_over(found)
            tqdm.write(f"{found}: this job died before its first checkpoint; starting over in it")
        elif found is not None:
            tqdm.write(f"resuming {found} (--resume auto)")
        choice = f"{int(continues)}{found or ''}"
    choice = distributed.broadcast_text(choice, d, device)
    return Path(choice[1:]) if choice[1:] else None, choice[0] == "1"


class Steps:
    """One training update at a time: the family's own (possibly alternating) step on this rank's share
    of the batch, the guard against non-finite steps, and the EMA."""

    def __init__(self, model: Family, ema: Family, opts: dict[str, GuardedOptimizer], ds: ImageDataset,
                 tc: TrainConfig, d: distributed.Dist | None, device: torch.device, amp_dtype: torch.dtype | None):
        self.model, self.opts, self.ds, self.tc, self.d, self.device, self.amp_dtype = model, opts, ds, tc, d, device, amp_dtype
        self.params, self.ema_params = list(model.parameters()), list(ema.parameters())
        self.buffers, self.ema_buffers = list(model.buffers()), list(ema.buffers())
        # Each rank draws its own noise: generators seeded by (run seed, rank, step) in a distributed run.
        self.noise_seed = tc.seed if d is None else mix_seed(tc.seed, 0xD15, d.rank)

    def update(self, step: int) -> tuple[dict[str, float], bool, float]:
        """(the step's losses, averaged over ranks; whether it was refused as non-finite; its seconds)."""
        tc, d, device, opts, buffers = self.tc, self.d, self.device, self.opts, self.buffers
        t0 = time.perf_counter()
        batch = distributed.shard(self.ds.batch_at(step, tc.batch_size, tc.seed), d)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if tc.channels_last:
            batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}
        saved_buffers = [b.clone() for b in buffers]
        skipped_before = sum(o.skipped for o in opts.values())
        amp = self.amp_dtype
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            losses = self.model.train_step(batch, opts, step_generator(self.noise_seed, step, device))
        losses = distributed.average_values(losses, d, device)

        # Guard: the GuardedOptimizers already refused every update with a non-finite gradient; a step
        # where that happened (or a loss is non-finite) is counted and its buffer updates rolled back.
        # Gradients and losses are averaged over ranks, so every rank reaches the same verdict.
        bad = sum(o.skipped for o in opts.values()) > skipped_before or not all(map(math.isfinite, losses.values()))
        if bad:
            for b, s in zip(buffers, saved_buffers):
                b.copy_(s)
        else:
            distributed.broadcast_buffers(buffers, d)      # rank 0's batch-norm statistics, as DDP does
            # EMA with warm-up, so early samples are not dominated by the random initial weights.
            decay = min(tc.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():     # one foreach call each, not one op per tensor (a launch each on a GPU)
                if self.ema_params:
                    torch._foreach_lerp_(self.ema_params, self.params, 1.0 - decay)
                if self.ema_buffers:
                    torch._foreach_copy_(self.ema_buffers, buffers)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return losses, bad, time.perf_counter() - t0
