"""Training speed of the default DCGAN, next to the machine's matmul peak and the classic recipe.

Prints, from one run:
  1. the machine's fp32 matmul GFLOP/s (median of repeated 2048^2 and 4096^2 products; the higher);
  2. the default DCGAN's training images/s on Fashion-MNIST at batch 128, measured by imagegen's own
     training loop (batching, guard and EMA included), and the GFLOP/s its training step achieves
     (matmul and convolution FLOPs of one step, counted by torch.utils.flop_counter, times steps/s);
  3. the images/s of the classic recipe a user would otherwise copy: the PyTorch DCGAN example's 64x64
     networks fed by a DataLoader whose Dataset resizes each item with PIL and normalises it;
and the two ratios the targets are stated in (>= 0.70 of matmul peak; >= 5x the classic recipe).

--isa avx2 (or sse41) runs everything as on a CPU without AVX-512 (or without AVX): it restarts itself
with PyTorch's, oneDNN's and MKL's instruction sets all limited (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS), so the matmul peak and the DCGAN are measured under the same limit. The first
line names the CPU and the instruction sets in use.

With --precision (bf16, fp16 on CUDA, or auto), it prints instead a table of every family's training
speed through imagegen's loop at its default batch, in fp32 and in that precision, on --device (auto:
the GPU when there is one, named in the header): images/s and the achieved TFLOP/s (FLOPs of one
training step counted by torch.utils.flop_counter, times steps/s).

    python benchmarks/train_speed.py [--steps 150] [--classic-steps 12] [--data fashion-mnist] [--isa avx2]
    python benchmarks/train_speed.py --precision bf16 [--device auto] [--families dcgan,ddpm] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import imagegen
from imagegen.models import REGISTRY
from imagegen.train import GuardedOptimizer, autocast_dtype, fit_model_to_data, pick_device, step_generator


# Environment that makes PyTorch (ATen), oneDNN (convolutions) and MKL (matmul) use at most an instruction set.
ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "sse41": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def machine() -> str:
    """The CPU model, its cores and the instruction sets PyTorch, oneDNN and MKL are limited to."""
    model = platform.processor() or platform.machine()
    try:
        info = open("/proc/cpuinfo").read().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = set(next(line for line in info if line.startswith("flags")).split(":", 1)[1].split())
        model += " (" + ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2") + ")"
    except (OSError, StopIteration):
        pass
    limits = ", ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ)
    return (f"{model}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"ATen {torch.backends.cpu.get_cpu_capability()}" + (f"; {limits}" if limits else ""))


def matmul_gflops(n: int, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def dcgan_speed(data: str, steps: int, batch_size: int) -> dict:
    """Run imagegen's loop with the default DCGAN config and read images/s from its log."""
    cfg = imagegen.resolve_config({"family": "dcgan", "data": {"source": data},
                                   "train": {"steps": steps, "batch_size": batch_size, "log_every": 10,
                                             "sample_every": 0, "checkpoint_every": 10**6, "grid_size": 16}})
    ds = imagegen.load_data(cfg.data)
    with tempfile.TemporaryDirectory() as out:
        run_dir = imagegen.train(cfg, out=out, progress=False, dataset=ds)
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records[2:]]  # the first windows include warm-up
    # FLOPs of one training step, counted on a fresh model with the same config.
    cfg = fit_model_to_data(cfg, ds)
    model = imagegen.build_model("dcgan", imagegen.config.to_dict(cfg.model)).to(memory_format=torch.channels_last)
    opts = {k: GuardedOptimizer(o) for k, o in model.configure_optimizers(cfg.train).items()}
    batch = ds.batch_at(0, batch_size, 0)
    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        model.train_step(batch, opts, step_generator(0, 0, torch.device("cpu")))
    flops = counter.get_total_flops()
    ips = statistics.median(speeds)
    return {"images_per_s": ips, "flops_per_step": flops, "gflops": flops * ips / batch_size / 1e9,
            "windows": len(speeds)}


# --- the classic recipe, written out as a user would copy it from the PyTorch DCGAN example ------------


class ClassicG(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=1):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, x):
        return self.main(x)


class ClassicD(nn.Module):
    def __init__(self, ndf=64, nc=1):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, x):
        return self.main(x)


class ClassicDataset(torch.utils.data.Dataset):
    """Per item: uint8 array -> PIL image -> Resize(64) -> ToTensor -> Normalize((0.5,), (0.5,))."""

    def __init__(self, images: np.ndarray, size: int = 64):
        self.images, self.size = images, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i]).resize((self.size, self.size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
        return (x - 0.5) / 0.5, 0


def classic_speed(data: str, steps: int, batch_size: int, workers: int = 2) -> float:
    ds = imagegen.load_data(data)
    loader = torch.utils.data.DataLoader(ClassicDataset(ds.images[:, 0].numpy()), batch_size=batch_size,
                                         shuffle=True, num_workers=workers, drop_last=True)
    torch.manual_seed(0)
    G, D = ClassicG(), ClassicD()
    criterion = nn.BCELoss()
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    times, t = [], time.perf_counter()
    for i, (real, _) in enumerate(loader):
        b = real.size(0)
        D.zero_grad()
        err_real = criterion(D(real).view(-1), torch.full((b,), 1.0))
        err_real.backward()
        fake = G(torch.randn(b, 100, 1, 1))
        err_fake = criterion(D(fake.detach()).view(-1), torch.full((b,), 0.0))
        err_fake.backward()
        opt_d.step()
        G.zero_grad()
        err_g = criterion(D(fake).view(-1), torch.full((b,), 1.0))
        err_g.backward()
        opt_g.step()
        now = time.perf_counter()
        times.append(now - t)
        t = now
        if i + 1 >= steps:
            break
    return batch_size / statistics.median(times[2:])  # skip worker start-up and warm-up


PAIRS = {"fashion-mnist": "pair:fashion-mnist:sneaker,ankle-boot", "mnist": "pair:mnist:3,8"}


def family_speed(family: str, data, precision: str, device: str, steps: int) -> dict:
    """images/s (median of log windows after warm-up) and FLOPs of one training step, at `precision`."""
    cfg = imagegen.resolve_config({"family": family, "data": {"source": data.name},
                                   "train": {"steps": steps, "log_every": 5, "sample_every": 0, "grid_size": 4,
                                             "checkpoint_every": 10**6, "precision": precision, "device": device}})
    with tempfile.TemporaryDirectory() as out:
        run_dir = imagegen.train(cfg, out=out, progress=False, dataset=data)
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    ips = statistics.median([r["images_per_s"] for r in records[2:]] or [records[-1]["images_per_s"]])
    dev = pick_device(device)
    cfg = fit_model_to_data(cfg, data)
    model = imagegen.build_model(family, imagegen.config.to_dict(cfg.model)).to(dev, memory_format=torch.channels_last)
    opts = {k: GuardedOptimizer(o) for k, o in model.configure_optimizers(cfg.train).items()}
    batch = {k: v.to(dev) for k, v in data.batch_at(0, cfg.train.batch_size, 0).items()}
    with FlopCounterMode(display=False) as counter:
        model.train_step(batch, opts, step_generator(0, 0, dev))
    return {"images_per_s": ips, "batch": cfg.train.batch_size, "flops": counter.get_total_flops()}


def precision_table(a) -> None:
    dev = pick_device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine()
    print(f"# {dev.type}: {name}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads; "
          f"{a.steps} steps per measurement; precision {a.precision} -> {autocast_dtype(a.precision, dev)}")
    print(f"| family | batch | fp32 images/s | fp32 TFLOP/s | {a.precision} images/s | {a.precision} TFLOP/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    plain = imagegen.load_data(a.data)
    for family in a.families.split(","):
        data = imagegen.load_data(PAIRS.get(a.data, "pair:shapes:circle,square")) if REGISTRY[family].translates else plain
        r32 = family_speed(family, data, "fp32", a.device, a.steps)
        rlo = family_speed(family, data, a.precision, a.device, a.steps)
        t32, tlo = (r["flops"] * r["images_per_s"] / r["batch"] / 1e12 for r in (r32, rlo))
        print(f"| {family} | {r32['batch']} | {r32['images_per_s']:.0f} | {t32:.3f} | {rlo['images_per_s']:.0f} | "
              f"{tlo:.3f} | {rlo['images_per_s'] / r32['images_per_s']:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--classic-steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16"], help="print the per-family fp32 vs PRECISION table")
    p.add_argument("--device", default="auto")
    p.add_argument("--families", default=",".join(f for f in REGISTRY if f != "random"))
    p.add_argument("--isa", choices=["native", *ISA_ENV], default="native",
                   help="limit PyTorch, oneDNN and MKL to this instruction set (restarts the script)")
    a = p.parse_args()
    if a.classic_steps < 3:
        p.error(f"--classic-steps must be at least 3 (its first two steps are warm-up), got {a.classic_steps}")
    if a.isa != "native" and any(os.environ.get(k) != v for k, v in ISA_ENV[a.isa].items()):
        # The libraries read these when they first run, so the limit needs a fresh process.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_ENV[a.isa]})
    if a.precision:
        if a.steps == 150:
            a.steps = 40
        return precision_table(a)

    print(f"machine: {machine()}")
    peak_before = max(matmul_gflops(2048), matmul_gflops(4096, reps=4))
    ours = dcgan_speed(a.data, a.steps, a.batch_size)
    classic = classic_speed(a.data, a.classic_steps, a.batch_size)
    peak_after = max(matmul_gflops(2048), matmul_gflops(4096, reps=4))
    peak = max(peak_before, peak_after)

    print(f"fp32 matmul peak:           {peak:8.1f} GFLOP/s  (before {peak_before:.1f}, after {peak_after:.1f})")
    print(f"default DCGAN, batch {a.batch_size}:   {ours['images_per_s']:8.1f} images/s  "
          f"(median of {ours['windows']} log windows; {ours['flops_per_step'] / 1e9:.2f} GFLOP per step)")
    print(f"default DCGAN training:     {ours['gflops']:8.1f} GFLOP/s")
    print(f"classic recipe (64x64, DataLoader + PIL): {classic:8.1f} images/s")
    print(f"ratio  DCGAN GFLOP/s / matmul peak:      {ours['gflops'] / peak:6.2f}   (target >= 0.70)")
    print(f"ratio  DCGAN images/s / classic recipe:  {ours['images_per_s'] / classic:6.1f}x  (target >= 5x)")


if __name__ == "__main__":
    main()
