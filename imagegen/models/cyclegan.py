"""CycleGAN: unpaired image-to-image translation between two domains A and B.

Implements Zhu, Park, Isola & Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks" (ICCV 2017):
- two ResNet-style generators, G_ab: A -> B and G_ba: B -> A (Johnson et al., "Perceptual Losses for
  Real-Time Style Transfer", 2016): 7x7 stem, strided downsampling, residual blocks, transposed-conv
  upsampling, reflection padding and instance norm throughout;
- two PatchGAN discriminators (Isola et al., "Image-to-Image Translation with Conditional Adversarial
  Networks", 2017) that score overlapping patches, so D_b says "this patch looks like B";
- the least-squares adversarial loss (Mao et al., "Least Squares Generative Adversarial Networks", 2017);
- cycle consistency |G_ba(G_ab(a)) - a|_1 (and the same for b), and the identity loss |G_ab(b) - b|_1
  that keeps a generator from changing what is already in its target domain;
- a pool of 50 past fakes per domain, half of each D batch drawn from it (Shrivastava et al., 2017);
- Adam at 2e-4, constant, then decayed linearly to zero.

Departures from the reference code, for small images on a CPU: batches of 16 instead of 1 (instance
norm makes each image independent of the others anyway), networks sized for 28-64 px (two downsamplings,
4 residual blocks at width 16 by default; `width`, `blocks` and `downsample` scale it up), the
learning-rate decay set in steps (`decay_start`, `decay_end`) instead of epochs, and no identity loss by
default: it keeps colours in photo <-> painting tasks, but it fights translations that change shape
(sneaker -> ankle boot: 92.8% instead of 94.3% of boots recognised as sneakers, and 40% slower, in
our 2400-step comparison); `identity_weight = 5` restores the paper's setting. The image pool lives in
buffers, so it is checkpointed and resume is exact.

Shapes: images are N x C x S x S in [-1, 1]; S must be divisible by 2^downsample. The PatchGAN maps
N x C x S x S to N x 1 x P x P patch scores (P = 5 at S = 28).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from ..config import MAX_COUNT, MAX_IMAGE_SIZE, MAX_WEIGHT, MAX_WIDTH, ranged
from ..errors import ConfigError
from ..nets.layers import Conv2d, ConvTranspose2d
from .base import ExportSpec, Family, Generators, adam, eval_mode

Direction = Literal["a2b", "b2a"]
DIRECTIONS = ("a2b", "b2a")


@dataclass
class Config:
    image_size: int = ranged(28, 8, MAX_IMAGE_SIZE)   # filled in from the data
    channels: int = ranged(1, 1, 3)                   # filled in from the data
    domain_a: str = "A"           # domain names, filled in from the data (for messages and grids)
    domain_b: str = "B"
    width: int = ranged(16, 1, MAX_WIDTH)       # channels of the generators' first layer and of D's first layer
    downsample: int = ranged(2, 0, 6)           # strided convolutions in G (28 px -> 7 px at 2)
    blocks: int = ranged(4, 1, 64)              # residual blocks at the lowest resolution
    d_layers: int = ranged(2, 1, 8)             # strided layers in the PatchGAN (more = larger patches)
    cycle_weight: float = ranged(10.0, 0.0, MAX_WEIGHT)   # lambda of the cycle-consistency L1 loss
    # weight of the identity L1 loss; 5 is the paper's 0.5 x cycle_weight (see below)
    identity_weight: float = ranged(0.0, 0.0, MAX_WEIGHT)
    pool_size: int = ranged(50, 0, 10_000)      # past fakes kept per domain for the discriminators (0 = no pool)
    lr: float = ranged(2e-4, 0.0, 1.0, lo_open=True)
    beta1: float = ranged(0.5, 0.0, 1.0, hi_open=True)
    beta2: float = ranged(0.999, 0.0, 1.0, hi_open=True)
    decay_start: int = ranged(1500, 0, MAX_COUNT)   # step at which the learning rate starts its linear decay...
    decay_end: int = ranged(3000, 1, MAX_COUNT)     # ... reaching zero here (train.steps defaults to this)

    def validate(self) -> None:
        if self.image_size % (2 ** self.downsample):
            raise ConfigError(f"model.image_size {self.image_size} is not divisible by 2^downsample = "
                              f"{2 ** self.downsample} (cyclegan)")
        if self.decay_end <= self.decay_start:
            raise ConfigError(f"model.decay_end ({self.decay_end}) must be after model.decay_start ({self.decay_start})")

    def lr_at(self, step: int) -> float:
        """Constant until decay_start, then linear to zero at decay_end (and zero after)."""
        frac = (step - self.decay_start) / (self.decay_end - self.decay_start)
        return self.lr * min(1.0, max(0.0, 1.0 - frac))


# --- networks ----------------------------------------------------------------------------------------

def _norm(ch: int) -> nn.Module:
    # Instance norm without affine parameters or running statistics, as in the reference: train and eval
    # behave the same, and every image is normalised on its own (so batch composition changes nothing).
    return nn.InstanceNorm2d(ch)


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), Conv2d(ch, ch, 3, bias=False), _norm(ch), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), Conv2d(ch, ch, 3, bias=False), _norm(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """N x C x S x S -> N x C x S x S in [-1, 1]: stem, `downsample` strided convs (channels double),
    `blocks` residual blocks at S / 2^downsample, transposed convs back up, 7x7 head and tanh."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        w, c = cfg.width, cfg.channels
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), Conv2d(c, w, 7, bias=False), _norm(w), nn.ReLU(inplace=True)]
        for i in range(cfg.downsample):
            layers += [Conv2d(w * 2 ** i, w * 2 ** (i + 1), 3, stride=2, padding=1, bias=False),
                       _norm(w * 2 ** (i + 1)), nn.ReLU(inplace=True)]
        layers += [ResBlock(w * 2 ** cfg.downsample) for _ in range(cfg.blocks)]
        for i in reversed(range(cfg.downsample)):
            layers += [ConvTranspose2d(w * 2 ** (i + 1), w * 2 ** i, 3, stride=2, padding=1, output_padding=1, bias=False),
                       _norm(w * 2 ** i), nn.ReLU(inplace=True)]
        layers += [nn.ReflectionPad2d(3), Conv2d(w, c, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """N x C x S x S -> N x 1 x P x P raw patch scores (LSGAN targets: 1 real, 0 fake)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        w = cfg.width
        layers: list[nn.Module] = [Conv2d(cfg.channels, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        ch = w
        for _ in range(cfg.d_layers - 1):
            layers += [Conv2d(ch, ch * 2, 4, stride=2, padding=1, bias=False), _norm(ch * 2), nn.LeakyReLU(0.2, inplace=True)]
            ch *= 2
        layers += [Conv2d(ch, ch * 2, 4, stride=1, padding=1, bias=False), _norm(ch * 2), nn.LeakyReLU(0.2, inplace=True),
                   Conv2d(ch * 2, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) for convolutions, as in the reference code."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --- the family --------------------------------------------------------------------------------------

class CycleGAN(Family):
    name = "cyclegan"
    summary = "unpaired translation between two domains"
    Config = Config
    train_defaults = {"steps": 3000, "batch_size": 16, "sample_every": 400, "checkpoint_every": 400}
    sample_options = {}
    translates = True   # a translation family: images in, images out; `sample` from noise does not apply

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.g_ab, self.g_ba = Generator(cfg), Generator(cfg)
        self.d_a, self.d_b = PatchDiscriminator(cfg), PatchDiscriminator(cfg)
        init_weights(self)
        # Image pools of past fakes (pool_a holds fakes of domain A) and how full each is. Buffers, so
        # they are checkpointed: resume continues with the same pool. steps_done drives the lr schedule.
        shape = (cfg.pool_size, cfg.channels, cfg.image_size, cfg.image_size)
        self.register_buffer("pool_a", torch.zeros(shape))
        self.register_buffer("pool_b", torch.zeros(shape))
        self.register_buffer("pool_fill", torch.zeros(2, dtype=torch.long))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @classmethod
    def fit_config(cls, cfg, dataset):
        domains = getattr(dataset, "domains", None)
        if domains is None:
            raise ConfigError(f"model 'cyclegan' translates between two domains; {dataset.name!r} is one set of "
                              f"images (use --data pair:DIR or pair:DATASET:CLASS_A,CLASS_B)")
        return replace(super().fit_config(cfg, dataset), domain_a=domains[0], domain_b=domains[1])

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        betas = (self.cfg.beta1, self.cfg.beta2)
        g = list(self.g_ab.parameters()) + list(self.g_ba.parameters())
        d = list(self.d_a.parameters()) + list(self.d_b.parameters())
        return {"g": adam(g, self.cfg.lr, betas), "d": adam(d, self.cfg.lr, betas)}

    def _query_pool(self, pool: torch.Tensor, slot: int, fakes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The reference ImagePool: while the pool fills, fakes go in and pass through; once full, each
        fake is, with probability 1/2, swapped for a random stored one (which D then sees instead)."""
        size = self.cfg.pool_size
        if size == 0:
            return fakes
        n = fakes.shape[0]
        coins = torch.rand(n, generator=gen, device=gen.device).tolist()
        picks = torch.randint(size, (n,), generator=gen, device=gen.device).tolist()
        out = []
        for i in range(n):
            fill = int(self.pool_fill[slot])
            if fill < size:
                pool[fill].copy_(fakes[i])
                self.pool_fill[slot] += 1
                out.append(fakes[i])
            elif coins[i] > 0.5:
                out.append(pool[picks[i]].clone())
                pool[picks[i]].copy_(fakes[i])
            else:
                out.append(fakes[i])
        return torch.stack(out)

    def train_step(self, batch: dict[str, torch.Tensor], opt: dict, gen: torch.Generator) -> dict[str, float]:
        a, b = batch["a"], batch["b"]              # N x C x S x S each, unpaired
        c = self.cfg
        lr = c.lr_at(int(self.steps_done))
        for o in opt.values():
            for group in o.param_groups:
                group["lr"] = lr

        # Generators: fool both discriminators, come back round the cycle, leave target-domain images alone.
        self.d_a.requires_grad_(False)
        self.d_b.requires_grad_(False)
        fake_b, fake_a = self.g_ab(a), self.g_ba(b)
        rec_a, rec_b = self.g_ba(fake_b), self.g_ab(fake_a)
        adv = (self.d_b(fake_b) - 1).square().mean() + (self.d_a(fake_a) - 1).square().mean()
        cycle = (rec_a - a).abs().mean() + (rec_b - b).abs().mean()
        loss_g = adv + c.cycle_weight * cycle
        identity = torch.zeros(())
        if c.identity_weight:
            identity = (self.g_ab(b) - b).abs().mean() + (self.g_ba(a) - a).abs().mean()
            loss_g = loss_g + c.identity_weight * identity
        opt["g"].zero_grad(set_to_none=True)
        self.backward(loss_g)
        opt["g"].step()
        self.d_a.requires_grad_(True)
        self.d_b.requires_grad_(True)

        # Discriminators: real -> 1, fake (half of them from the pool of past fakes) -> 0.
        with torch.no_grad():
            pooled_b = self._query_pool(self.pool_b, 1, fake_b.detach(), gen)
            pooled_a = self._query_pool(self.pool_a, 0, fake_a.detach(), gen)
        loss_d_b = 0.5 * ((self.d_b(b) - 1).square().mean() + self.d_b(pooled_b).square().mean())
        loss_d_a = 0.5 * ((self.d_a(a) - 1).square().mean() + self.d_a(pooled_a).square().mean())
        opt["d"].zero_grad(set_to_none=True)
        self.backward(loss_d_a + loss_d_b)
        opt["d"].step()
        self.steps_done += 1
        return {"loss_g_adv": adv.item(), "loss_cycle": cycle.item(), "loss_identity": identity.item(),
                "loss_d_a": loss_d_a.item(), "loss_d_b": loss_d_b.item(), "lr": lr}

    # --- translation -------------------------------------------------------------------------------

    def generator(self, direction: str) -> Generator:
        if direction not in DIRECTIONS:
            raise ConfigError(f"--direction must be a2b or b2a, got {direction!r}")
        return self.g_ab if direction == "a2b" else self.g_ba

    def export_spec(self, direction: str = "a2b") -> ExportSpec:
        """One generator: an image of one domain -> the other's (`direction`)."""
        g = self.generator(direction)
        # The output may not share the input's name in ONNX.
        return ExportSpec(lambda x: g(x), ["image"], ["translated"],
                          f"translated = G_{direction}(image): one domain's image to the other's",
                          {"imagegen.direction": direction})

    @torch.no_grad()
    def translate(self, images: torch.Tensor, direction: str = "a2b") -> torch.Tensor:
        """N x C x S x S in [-1, 1] from the source domain -> the same images in the other domain.
        Deterministic, and each image is independent of the rest of the batch."""
        g = self.generator(direction)
        self._check_images(images)
        with eval_mode(self):
            return self.run(g, images.to(self.device, torch.float32))

    @torch.no_grad()
    def cycle(self, images: torch.Tensor, direction: str = "a2b") -> tuple[torch.Tensor, torch.Tensor]:
        """(translated, reconstructed): the images taken to the other domain and back."""
        there = self.translate(images, direction)
        return there, self.translate(there, "b2a" if direction == "a2b" else "a2b")

    def _check_images(self, images: torch.Tensor) -> None:
        c, s = self.cfg.channels, self.cfg.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ConfigError(f"this cyclegan translates {c} x {s} x {s} images, got {tuple(images.shape[1:])}")

    def sample(self, n: int, *, labels: torch.Tensor | None = None, generator: Generators = None, **opts) -> torch.Tensor:
        raise ConfigError("a cyclegan model translates images rather than drawing them from noise: "
                          "use `imagegen translate RUN --direction a2b --input PATH --out DIR`")

    def preview(self, dataset, n: int) -> tuple[torch.Tensor, int]:
        """The training grid: for up to 8 fixed images of each domain, rows of input / translated /
        reconstructed (A first, then B)."""
        k = max(1, min(8, n // 6, len(dataset.a), len(dataset.b)))
        rows = []
        for direction, domain in (("a2b", dataset.a), ("b2a", dataset.b)):
            x = domain.batch(torch.arange(min(k, len(domain))))["image"]
            there, back = self.cycle(x, direction)
            rows += [x, there.cpu(), back.cpu()]
        return torch.cat(rows), rows[0].shape[0]
