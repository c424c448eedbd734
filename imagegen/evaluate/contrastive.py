"""The label-free evaluator: the evaluator's network (evaluator.EvalNet) trained on a folder's own images
by contrast, for data with no classes (a folder of photos, a captioned folder).

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (SimCLR, ICML 2020):
two random views of each image in a batch, the NT-Xent loss that asks each view to pick out its twin
among the 2N - 1 others, features taken before the projection head. Why this and not the autoencoder's
latents: the latents are a spatial map (4 x 16 x 16 at 64 px), whose distance is a pixel distance in
disguise (a one-pixel shift moves every entry), and pooled they lose what is where; a contrastive network
gives a compact vector (4 x width) that keeps content, as the supervised evaluator's does, and needs no
other run.

The views are the image flipped or not and its brightness, contrast and saturation jittered. SimCLR's
random crops are left out: they teach the features to ignore where things are, and a one-pixel shift then
reads as the floor (on `emoji` at 64 px, crops of 80-100%: shift 0.077 against a floor of 0.075; without:
0.066 against 0.064, below grain 0.080 and blur 0.47). No blur and no noise either: the features must see
both, since the anchors (blur, grain, noise) measure them. Batches and views come from generators seeded by (seed,
step): the same data and config give the same network on the same machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.dataset import mix_seed

PROJECTION = 64        # the projection head's width (the loss's space; features are taken before it)
TEMPERATURE = 0.2
MIN_STEPS = 400        # at least this many updates, whatever the epochs (a small folder has few batches)
BATCH = 256            # images per forward pass when measuring
JITTER = 0.4          # brightness, contrast and saturation each scaled by 1 +- up to this


def seeded(seed: int, step: int) -> torch.Generator:
    """A generator for one step's random draws, from (seed, step) alone."""
    return torch.Generator().manual_seed(mix_seed(seed, step))


def views(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random view of each image of x (N x C x S x S in [-1, 1]): a horizontal flip and a jitter of
    brightness, contrast and saturation."""
    n, c = x.shape[:2]
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.where(flip[:, None, None, None], x.flip(-1), x)
    bright, contrast, sat = (1 + JITTER * (2 * torch.rand(3, n, 1, 1, 1, generator=gen) - 1)).unbind(0)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean
    if c == 3:
        gray = out.mean(1, keepdim=True)
        out = (out - gray) * sat + gray
    return ((out + 1) * bright - 1).clamp(-1, 1)


def nt_xent(z: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The NT-Xent loss of 2N projections (rows i and i + N are two views of one image)."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def fit_contrastive(net, train_ds, cfg, log=print):
    """net (an EvalNet whose head is PROJECTION wide) trained by contrast on train_ds's images; cfg is the
    EvaluatorConfig (epochs, at least MIN_STEPS updates; batch size, lr, seed)."""
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    steps = max(MIN_STEPS, cfg.epochs * train_ds.steps_per_epoch(cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    net.train()
    for step in range(steps):
        x = train_ds.batch_at(step, cfg.batch_size, cfg.seed)["image"]
        gen = seeded(cfg.seed, step)
        loss = nt_xent(net(torch.cat([views(x, gen), views(x, gen)])))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % 100 == 0:
            log(f"contrastive step {step + 1}/{steps}  loss {loss.item():.3f}")
    return net.eval()


def retrieval_accuracy(net, ds, gen_seed: int = 1) -> float:
    """The share of test images whose view finds its own image nearest among all the images' features:
    how well the features tell the images apart (the classifier's test accuracy's stand-in)."""
    with torch.no_grad():
        feats, viewed = [], []
        for i in range(0, len(ds), BATCH):
            x = ds.batch(torch.arange(i, min(i + BATCH, len(ds))))["image"]
            feats.append(F.normalize(net.features(x), dim=1))
            viewed.append(F.normalize(net.features(views(x, seeded(gen_seed, i))), dim=1))
        a, b = torch.cat(feats), torch.cat(viewed)
    return float(((b @ a.T).argmax(1) == torch.arange(len(a))).float().mean())
