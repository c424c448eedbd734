"""What an FD means in an evaluator's feature space: the FD (and precision / recall) of real training
images after small, known damage, against the real test split, under the protocol `imagegen evaluate`
uses. It shows how far from the floor a model can be while its images look right: a one-pixel shift of
every real image, or noise of a few grey levels, already moves the FD tens of times above the floor.

    python benchmarks/fd_scale.py [--data fashion-mnist] [--n 10000]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from imagegen.data import DataConfig, load_data
from imagegen.evaluate import metrics as M
from imagegen.evaluate.anchors import gaussian_blur, shifted
from imagegen.evaluate.evaluator import get_evaluator
from imagegen.sample import to_float


def damaged(real: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Named copies of `real` (N x C x H x W in [-1, 1]), each with one kind of small damage."""
    size = real.shape[-1]
    out = {"none (the floor)": real}
    for s in (0.02, 0.05, 0.1):
        out[f"Gaussian noise, sigma {s} ({s * 127.5:.1f} grey levels)"] = real + s * torch.randn(real.shape, generator=gen)
    for q in (16, 4):
        out[f"posterised to {q} grey levels"] = torch.round((real + 1) / 2 * (q - 1)) / (q - 1) * 2 - 1
    out["shifted 1 px right (wrapped)"] = shifted(real)
    for s in (0.3, 0.5, 1.0):
        out[f"Gaussian blur, sigma {s} px"] = gaussian_blur(real, s)
    half = F.interpolate(real, size=size // 2, mode="bilinear", antialias=True)
    out["half resolution, scaled back up"] = F.interpolate(half, size=size, mode="bilinear")
    return {k: v.clamp(-1, 1) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--n", type=int, default=10_000, help="training images damaged and compared")
    args = ap.parse_args()
    extractor = get_evaluator(args.data)
    test = load_data(DataConfig(source=args.data, split="test"))
    train = load_data(DataConfig(source=args.data))
    gen = torch.Generator().manual_seed(0)
    real = to_float(train.images[torch.randperm(len(train), generator=gen)[:args.n]])
    fr = extractor.features(to_float(test.images))
    print(f"{args.n} damaged training images vs {len(test)} test images, evaluator {extractor.name}\n")
    print("| damage | FD | FD / floor | precision | recall |\n|---|---|---|---|---|")
    floor = None
    for name, images in damaged(real, gen).items():
        ff = extractor.features(images)
        fd = M.frechet_distance(fr, ff)
        floor = floor or fd
        precision, recall = M.precision_recall(fr, ff)
        print(f"| {name} | {fd:.3f} | {fd / floor:.0f}x | {precision:.3f} | {recall:.3f} |", flush=True)


if __name__ == "__main__":
    main()
