"""What runs only on a CUDA GPU: bf16 autocast on the DiT, the fp16 gradient scaler, and sampling on the
device. Marked `cuda`: left out where there is no GPU (conftest.py), run by benchmarks/gpu_check.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

import imagegen
from imagegen.sample import generate

pytestmark = pytest.mark.cuda


def trained_on_cuda(tmp_path, family: str, model: dict, precision: str):
    cfg = imagegen.resolve_config({"family": family, "model": model, "data": {"source": "shapes", "limit": 512},
                                   "train": {"steps": 8, "batch_size": 32, "precision": precision, "device": "cuda",
                                             "sample_every": 0, "log_every": 4, "val_every": 0}})
    return imagegen.train(cfg, out=tmp_path, progress=False)


@pytest.mark.parametrize("family, model, precision", [("flow", {"backbone": "dit", "dit_size": "xxs"}, "bf16"),
                                                      ("dcgan", {"width": 16}, "fp16")])
def test_training_under_autocast_on_the_gpu_gives_finite_losses_and_a_loadable_run(tmp_path, family, model, precision):
    run_dir = trained_on_cuda(tmp_path, family, model, precision)
    losses = [v for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()
              for k, v in json.loads(line).items() if k.startswith("loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    run = imagegen.load_run(run_dir, device="cuda")
    images = generate(run.model, [0, 1, 2, 3])
    assert images.shape[0] == 4 and torch.isfinite(images).all() and images.abs().max() <= 1


def test_a_seed_draws_nearly_the_same_image_at_any_batch_on_the_gpu(tmp_path):
    """On the CPU the image of a seed is bit-identical at any batch; on a GPU kernels may differ by batch
    size, so this bounds the difference (benchmarks/gpu_check.py reports its size)."""
    run = imagegen.load_run(trained_on_cuda(tmp_path, "dcgan", {"width": 16}, "fp32"), device="cuda")
    seeds = list(range(16))
    together = generate(run.model, seeds, batch_size=16)
    alone = torch.cat([generate(run.model, [s], batch_size=1) for s in seeds])
    assert (together - alone).abs().max().item() < 1e-2
