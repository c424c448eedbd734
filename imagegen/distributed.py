"""Data-parallel training across processes with torch.distributed, launched by torchrun.

    torchrun --nproc_per_node=2 -m imagegen train --data fashion-mnist --model dcgan
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 -m imagegen train ...

What each process does (train.py calls the functions below):
- joins the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT,
  with NCCL on CUDA and gloo on CPU, and a collective timeout, so a rank whose peer died fails instead of
  hanging;
- takes its shard of the global batch (train.batch_size is the global batch; rank r gets rows
  r*B/W .. (r+1)*B/W-1 of the batch the step would use in one process) and draws its noise from a
  generator seeded by (run seed, rank, step);
- before every optimizer step, averages the gradients over all ranks in one flat all-reduce, so every
  rank applies the same update and the parameters stay bit-identical;
- after every step, takes rank 0's buffers (batch-norm statistics, image pools), as DDP's
  broadcast_buffers does, and averages the logged losses so every rank makes the same decisions.

Why not the DistributedDataParallel wrapper itself: DDP hooks one forward pass per backward, while a
family's train_step runs several networks and several backward passes (D, then G through D) with
their own optimizers. Averaging the gradients in the optimizer step is what DDP's reducer does, done
where our families step; StyleGAN2-ADA and StyleGAN3 train their GANs the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError, TrainingError

TIMEOUT_S = 60          # a collective that waits longer than this (a dead or stuck peer) fails the run


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    owns_group: bool            # we initialised the process group (and tear it down at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not launched by it."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as e:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from None


def elastic_job() -> str | None:
    """The id torchrun's elastic agent gives this job: the same in every worker and across the agent's
    restarts of them (--max-restarts). "" under the agent when the id names no job (a multi-node launch
    with a fixed master address and no --rdzv-id has "none"); None when not launched by torchrun."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    return None if job is None else "" if job == "none" else job


def setup(device: torch.device) -> Dist | None:
    """Join (or reuse) the process group; None for a single process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=False)
    rank, world, local_rank = from_env()
    if world <= 1:
        return None
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    # torch.distributed.nn binds `group=group.WORLD` as a default argument when it is first imported,
    # and torch.optim imports it (through torch._dynamo) when the first optimizer is built. Imported
    # after init_process_group, it would hold the group for good: destroy_process_group could not free
    # it, gloo's worker threads would outlive teardown, and one still releasing a collective's tensors
    # during interpreter shutdown aborts the process ("terminate called without an active exception").
    # Imported here, while there is no group yet, it holds None.
    import torch.distributed.nn  # noqa: F401
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    try:
        store = {}
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None:
            # torchrun's elastic agent serves one store to all its attempts, and the process group
            # publishes each rank's address under the same keys every time: a restarted rank could read
            # the address of a rank that died and fail to connect ("Connection refused"). Each attempt
            # gets keys of its own.
            agent_store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            store = {"store": dist.PrefixStore(f"imagegen/attempt-{attempt}", agent_store)}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **store,
                                **({"device_id": device} if device.type == "cuda" else {}))
    except (RuntimeError, ValueError) as e:
        raise TrainingError(f"rank {rank}: could not join the process group of {world} ({backend}): {e}") from None
    return Dist(rank, world, local_rank, owns_group=True)


def teardown(d: Dist | None) -> None:
    if d is not None and d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: dict[str, torch.Tensor], d: Dist | None) -> dict[str, torch.Tensor]:
    """This rank's contiguous slice of the global batch (every tensor's first dimension)."""
    if d is None:
        return batch
    return {k: v.tensor_split(d.world)[d.rank] for k, v in batch.items()}


def _collective(what: str, fn, d: Dist):
    try:
        return fn()
    except RuntimeError as e:     # gloo / NCCL errors, timeouts: a peer died or hangs
        raise TrainingError(f"rank {d.rank}: {what} failed, another rank has died or stalled "
                            f"({str(e).splitlines()[0][:200]})") from None


def _through_flat(tensors: list[torch.Tensor], op) -> None:
    """op(flat) on one flat copy of the tensors (one collective instead of many), then copied back."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    op(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(grads: list[torch.Tensor], d: Dist | None) -> None:
    """Replace each gradient by its mean over ranks, in one flat all-reduce (in place)."""
    if d is None or not grads:
        return

    def mean(flat: torch.Tensor) -> None:
        _collective("gradient all-reduce", lambda: dist.all_reduce(flat), d)
        flat /= d.world

    _through_flat(grads, mean)


def broadcast_buffers(buffers: list[torch.Tensor], d: Dist | None) -> None:
    """Every rank takes rank 0's buffers (float ones in one flat broadcast, others one by one)."""
    if d is None or not buffers:
        return
    floats = [b for b in buffers if b.is_floating_point()]
    if floats:
        _through_flat(floats, lambda flat: _collective("buffer broadcast", lambda: dist.broadcast(flat, 0), d))
    for b in buffers:
        if not b.is_floating_point():
            _collective("buffer broadcast", lambda: dist.broadcast(b, 0), d)


def average_values(values: dict[str, float], d: Dist | None, device: torch.device) -> dict[str, float]:
    """Logged losses averaged over ranks (the same keys on every rank)."""
    if d is None or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    _collective("loss all-reduce", lambda: dist.all_reduce(t), d)
    return dict(zip(values, (t / d.world).tolist()))


def same_everywhere(tensors: list[torch.Tensor], d: Dist | None) -> bool:
    """True when every rank holds bit-identical tensors (compares a SHA-256 of their raw bytes)."""
    if d is None:
        return True
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    device = tensors[0].device if tensors else torch.device("cpu")
    lo = torch.tensor([int.from_bytes(h.digest()[:7], "big")], dtype=torch.int64, device=device)
    hi = lo.clone()
    _collective("consistency check", lambda: dist.all_reduce(lo, op=dist.ReduceOp.MIN), d)
    _collective("consistency check", lambda: dist.all_reduce(hi, op=dist.ReduceOp.MAX), d)
    return bool(lo == hi)


def broadcast_text(text: str, d: Dist | None, device: torch.device) -> str:
    """Rank 0's string on every rank (the run folder's path), as bytes in a tensor: nothing is unpickled."""
    if d is None:
        return text
    data = torch.tensor(list(text.encode()) if d.main else [], dtype=torch.uint8, device=device)
    n = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    _collective("broadcast", lambda: dist.broadcast(n, 0), d)
    if not d.main:
        data = torch.zeros(int(n), dtype=torch.uint8, device=device)
    _collective("broadcast", lambda: dist.broadcast(data, 0), d)
    return bytes(data.cpu().tolist()).decode()
