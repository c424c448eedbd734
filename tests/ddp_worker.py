"""One process of a distributed test run: tests/test_distributed.py starts several, with torchrun's
environment variables (RANK, WORLD_SIZE, MASTER_ADDR...). Argument: a JSON object with the config tree,
`out`, optional `resume`, and `dump`: a folder where every rank writes its final weights."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

import imagegen
from imagegen.models import REGISTRY
from imagegen.models.base import Family


@dataclass
class LinConfig:
    image_size: int = 32
    channels: int = 3

    def validate(self) -> None:
        pass


class Lin(Family):
    """No batch statistics, no randomness: a 3x3 convolution asked to mirror each image, trained by SGD.
    Its last (rank-averaged) gradient is kept in a buffer, so tests can compare it across launches. It
    computes in float64, so a comparison at 1e-6 measures the data-parallel mechanism (sharding and
    averaging) rather than the float32 rounding of sums taken in another order."""
    name = "lin"
    Config = LinConfig

    def __init__(self, cfg: LinConfig) -> None:
        super().__init__(cfg)
        self.conv = nn.Conv2d(cfg.channels, cfg.channels, 3, padding=1).double()
        self.register_buffer("last_grad", torch.zeros(sum(p.numel() for p in self.conv.parameters()), dtype=torch.float64))

    def configure_optimizers(self, train_cfg):
        return {"g": torch.optim.SGD(self.parameters(), lr=0.05)}

    def train_step(self, batch, opt, gen):
        x = batch["image"].double()
        loss = (self.conv(x) - x.flip(-1)).square().mean()
        opt["g"].zero_grad(set_to_none=True)
        self.backward(loss)
        opt["g"].step()
        self.last_grad.copy_(torch.cat([p.grad.reshape(-1) for p in self.conv.parameters()]))
        return {"loss": loss.item()}

    def sample(self, n, *, labels=None, generator=None, **opts):
        return torch.zeros(n, self.cfg.channels, self.cfg.image_size, self.cfg.image_size)


REGISTRY["lin"] = Lin


def main() -> None:
    args = json.loads(sys.argv[1])
    cfg = imagegen.resolve_config(args["tree"])

    def dump(model, ema) -> None:
        if args.get("dump"):
            tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(tensors, os.path.join(args["dump"], f"rank{os.environ.get('RANK', '0')}.safetensors"))

    run_dir = imagegen.train(cfg, out=args["out"], resume=args.get("resume"), progress=False, on_end=dump)
    # train() must really free the process group: threads left running can abort the interpreter at exit.
    left = group_threads()
    if left:
        sys.exit(f"process group threads still running after train(): {left}")
    print(run_dir)


def group_threads() -> list[str]:
    """Names of this process's gloo threads (Linux: /proc/self/task/*/comm); [] where /proc is absent."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for t in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, t, "comm")) as f:
                names.append(f.read().strip())
        except OSError:           # the thread ended while we listed it
            pass
    return [n for n in names if "gloo" in n]


if __name__ == "__main__":
    main()
