"""Sample-quality metrics as pure functions of feature tensors (N x D) or class probabilities (N x K).

They know nothing of images or networks; the caller names the feature extractor (`FD-<evaluator>`).
- Fréchet distance: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium" (NeurIPS 2017), here on the features of imagegen's own evaluator, not Inception.
- KID: Bińkowski et al., "Demystifying MMD GANs" (ICLR 2018): unbiased MMD^2 with the cubic polynomial
  kernel, averaged over random subsets. Features are scaled to unit length first, so the kernel is
  bounded ((cos + 1)^3 in [0, 8]) and KID does not depend on the feature scale.
- Precision and recall: Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing
  Generative Models" (NeurIPS 2019): k-NN balls around each set.
- Density and coverage: Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models"
  (ICML 2020).
- Inception-style score: Salimans et al. (2016), exp E_x KL(p(y|x) || p(y)), from the evaluator's
  class probabilities.
"""

from __future__ import annotations

import math

import torch

CHUNK = 2048  # rows per block of pairwise distances: bounds memory at CHUNK x N floats


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D) and covariance (D x D), in float64."""
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / max(f.shape[0] - 1, 1)


def _sqrtm_psd(c: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance_from_stats(mu1: torch.Tensor, c1: torch.Tensor, mu2: torch.Tensor, c2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2): the Fréchet (2-Wasserstein) distance
    between two Gaussians. The symmetric form keeps every matrix PSD, so eigh is exact and stable."""
    mu1, c1, mu2, c2 = (t.double() for t in (mu1, c1, mu2, c2))
    s1 = _sqrtm_psd(c1)
    cross = torch.linalg.eigvalsh(s1 @ c2 @ s1).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + torch.trace(c1) + torch.trace(c2) - 2 * cross
    return max(float(value), 0.0)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    return frechet_distance_from_stats(*gaussian_stats(real), *gaussian_stats(fake))


def kid(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 50, subset_size: int = 1000,
        generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, standard deviation) over `subsets` random subsets."""
    x = torch.nn.functional.normalize(real.double(), dim=1)
    y = torch.nn.functional.normalize(fake.double(), dim=1)
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    values = []
    for _ in range(subsets):
        a = x[torch.randperm(x.shape[0], generator=gen)[:m]]
        b = y[torch.randperm(y.shape[0], generator=gen)[:m]]
        kxx, kyy, kxy = ((a @ a.T + 1) ** 3, (b @ b.T + 1) ** 3, (a @ b.T + 1) ** 3)
        off = m * (m - 1)
        mmd = (kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off - 2 * kxy.mean()
        values.append(float(mmd))
    t = torch.tensor(values)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def _kth_nn_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (N)."""
    radii = []
    for i in range(0, x.shape[0], CHUNK):
        d = torch.cdist(x[i:i + CHUNK], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)        # +1: the point itself is at distance 0
    return torch.cat(radii)


def _inside_counts(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each point, how many balls (centre, radius) contain it (N)."""
    counts = []
    for i in range(0, points.shape[0], CHUNK):
        counts.append((torch.cdist(points[i:i + CHUNK], centres) <= radii[None]).sum(1))
    return torch.cat(counts)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: share of fakes inside the real manifold (union of k-NN balls of reals);
    recall: share of reals inside the fake manifold."""
    real, fake = real.float(), fake.float()
    precision = (_inside_counts(fake, real, _kth_nn_radius(real, k)) > 0).float().mean()
    recall = (_inside_counts(real, fake, _kth_nn_radius(fake, k)) > 0).float().mean()
    return float(precision), float(recall)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Density: mean number of real k-NN balls holding each fake, over k (about 1 when the sets match);
    coverage: share of real balls that hold at least one fake."""
    real, fake = real.float(), fake.float()
    radii = _kth_nn_radius(real, k)
    density = _inside_counts(fake, real, radii).float().mean() / k
    covered = torch.zeros(real.shape[0], dtype=torch.bool)
    for i in range(0, real.shape[0], CHUNK):
        nearest = torch.cdist(real[i:i + CHUNK], fake).min(dim=1).values
        covered[i:i + CHUNK] = nearest <= radii[i:i + CHUNK]
    return float(density), float(covered.float().mean())


def inception_score(probs: torch.Tensor, eps: float = 1e-12) -> float:
    """exp(E_x KL(p(y|x) || p(y))) for class probabilities N x K: from 1 (useless) to K (every image
    confidently one class, all classes equally often)."""
    p = probs.double().clamp(min=eps)
    marginal = p.mean(0, keepdim=True)
    return float(torch.exp((p * (p.log() - marginal.log())).sum(1).mean()))


def class_coverage(probs: torch.Tensor) -> dict[str, float]:
    """How many classes the samples fall into (by argmax) and how evenly: a mode-collapse alarm.
    evenness = entropy of the class histogram / log K (1 = uniform, 0 = one class)."""
    k = probs.shape[1]
    counts = torch.bincount(probs.argmax(1), minlength=k).double()
    share = counts / counts.sum()
    nz = share[share > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {"classes_present": int((counts > 0).sum()), "classes": k,
            "evenness": entropy / math.log(k) if k > 1 else 1.0, "max_share": float(share.max())}


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB (N) of images N x C x H x W in [-1, 1] against the
    reference images, peak 2 (the 0..255 range of 8-bit pixels); identical images are capped at 120 dB."""
    mse = (images.double() - reference.double()).square().flatten(1).mean(1).clamp_min(4e-12)
    return 10 * torch.log10(4.0 / mse)
