"""The denoising backbone of the diffusion and flow families, chosen by `model.backbone`: the U-Net
(nets/unet.py) or the diffusion transformer (nets/dit.py). A family owns its objective and sampler; this
module holds the config fields both families share, builds the network they name, and (`BackboneFamily`)
the parts of training and sampling that do not depend on the objective: the optimizer and its step,
label dropout for guidance, the guided network call, per-image noise, inpainting canvases.

Both networks map (x N x C x H x W, t N, y N or None) -> N x C x H x W and start at zero output; a text
network (model.text_dim > 0, set when the training data has captions) also takes a text as three tensors
(pooled, tokens, mask: imagegen/text.py), and a caption dropped to the null text trains guidance as a
dropped label does. On data with layouts (`scenes`) a text model is grounded (nets/layout.py): a layout
prior learns text -> layout beside the backbone, which learns to draw the true layout; sampling draws a
layout per image from the prior, then the image to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_IMAGE_SIZE, MAX_WIDTH, ranged
from ..errors import ConfigError
from ..nets.dit import DiT
from ..nets.layout import LayoutPrior
from ..nets.unet import UNet
from ..solvers import Noise
from ..text import DIM as TEXT_DIM, pad_tokens
from ..text import MAX_TOKENS, TextEmbedding, encoder_id
from . import latent as latent_mode
from .base import ExportSpec, Family, Generators, adam, eval_mode, per_item_normal, per_item_uniform
from .latent import LatentSpace


SHIFT_BASE = 4096   # numbers per image up to which the resolution shift "by size" is none (shift_by_size)
LAYOUT_BATCH = 32   # captions per update of the layout prior's first stage (BackboneFamily.prepare)
# The first stage makes at most this many updates per training step of the run (and at least
# LAYOUT_MIN_UPDATES), so that a smoke run (`--steps 3`) does not fit the prior for minutes first. A prior
# update costs about a tenth of a backbone step; a full run on `scenes` (3,000 steps or more) keeps its
# `layout_epochs` passes.
LAYOUT_UPDATES_PER_STEP, LAYOUT_MIN_UPDATES = 4, 64


@dataclass
class BackboneConfig:
    image_size: int = ranged(28, 8, MAX_IMAGE_SIZE)   # filled in from the data
    channels: int = ranged(1, 1, 3)                   # filled in from the data
    num_classes: int = ranged(0, 1, 100_000, zero="unconditional")   # filled in from the data
    backbone: Literal["unet", "dit"] = "unet"
    # U-Net: channels at full resolution, a multiplier per resolution (each after the first halves it),
    # one self-attention block at the lowest resolution.
    width: int = ranged(32, 1, MAX_WIDTH)
    mults: tuple[int, ...] = (1, 2, 2)
    attention: bool = True
    # U-Net: the side of the pixel blocks folded into channels after a thin full-size stem (and unfolded
    # before a full-size head): 2 runs a 28 px image's levels at 14 and 7 px, for a fast one-step student.
    unet_patch: int = ranged(1, 1, 8)
    # DiT: a size from nets/dit.py SIZES (depth, width, heads) and the patch side in pixels.
    dit_size: Literal["xxs", "xs", "s", "m", "l"] = "xs"
    # 0: by what it sees: 4 on pixels (49 tokens at 28 px, a quarter of the cost per step of 2: 75 against
    # 285 ms), 2 on latents (64 tokens on the 16 x 16 latents of 64 px images; 4 would leave 16)
    patch: int = ranged(0, 1, 16, zero="4 on pixels, 2 on latents")
    # Text conditioning, filled in from the data: the encoder's width when it has captions, and its name.
    text_dim: int = ranged(0, 1, 4096, zero="no text")
    text_encoder: str = ""
    # U-Net: the lowest resolutions whose blocks are each followed by cross-attention to the text (0: only
    # the one in the middle, as runs saved before this field had).
    text_levels: int = ranged(2, 0, 6)
    text_positions: bool = True   # U-Net: each cross-attention's queries carry a 2-D position code
    # Share of training captions cut to their first phrase, up to the first comma ("grinning face" of
    # "grinning face, happy, smile"), so that a short prompt, as people type them, is not outside what
    # the model learned; a caption without a comma is its own first phrase.
    caption_short: float = ranged(0.0, 0.0, 1.0)
    # Layouts (nets/layout.py), filled in from data that has a ground-truth grid beside each caption
    # (`scenes`): the grid's side, its cell classes and the most objects a caption names. `grounded`
    # False trains the text model alone.
    grounded: bool = True
    layout_grid: int = ranged(0, 1, 16, zero="no layout")
    layout_classes: int = ranged(0, 2, 4096, zero="no layout")
    layout_slots: int = ranged(0, 1, 64, zero="no layout")
    # Passes over the data of the layout prior alone (batches of LAYOUT_BATCH), before the backbone's
    # first step; it goes on learning beside the backbone after. On `scenes` (20,000 captions) 16 passes
    # are 10,000 updates, about 5 minutes on 2 cores: it learns places and relations only after about
    # 8,000 updates, while the backbone learns to draw a given layout in far fewer steps.
    layout_epochs: float = ranged(16.0, 0.0, 10_000.0)
    # Latent mode (models/latent.py): an `ae` run folder whose latents the backbone learns. The rest is
    # filled in from that run and the data: the SHA-256 of its weights, its latent's shape, and the shift
    # and scale that give the training data's latents zero mean and unit variance.
    autoencoder: str = ""
    autoencoder_sha256: str = ""
    latent_factor: int = ranged(0, 2, 16, zero="pixels")
    latent_channels: int = ranged(0, 1, 64, zero="pixels")
    autoencoder_width: int = ranged(0, 1, MAX_WIDTH, zero="pixels")
    latent_shift: float = ranged(0.0, -1e6, 1e6)
    latent_scale: float = ranged(1.0, 0.0, 1e6, lo_open=True)

    @property
    def space(self) -> tuple[int, int]:
        """(channels, side) of what the backbone works on: the image's, or in latent mode its latent's."""
        if not self.latent_factor:
            return self.channels, self.image_size
        return self.latent_channels, self.image_size // self.latent_factor

    def shift_by_size(self) -> float:
        """k of the resolution shift (SD3 sec. 5.3.2; "simple diffusion", Hoogeboom et al. 2023) for what the
        backbone sees: sqrt(d / SHIFT_BASE) for its d = C x H x W numbers, and 1 (no shift) up to
        SHIFT_BASE, which holds every 32 px image and the 16 x 16 x 4 latents of 64 px ones. The signal-to-
        noise ratio of every noise level is divided by k^2: a large image, whose neighbouring pixels share
        more of their signal and so survive more noise, spends more of its training and sampling near pure
        noise. flow shifts its times, ddpm its alpha_bar table."""
        channels, side = self.space
        return max(1.0, math.sqrt(channels * side * side / SHIFT_BASE))

    def validate_backbone(self) -> None:
        latent = (self.autoencoder_sha256, self.latent_factor, self.latent_channels, self.autoencoder_width)
        if any(latent) and not (self.autoencoder and all(latent)):
            raise ConfigError("model.autoencoder_sha256, latent_factor, latent_channels and autoencoder_width are "
                              "filled in from model.autoencoder (an ae run); set that instead")
        if self.latent_factor and self.image_size % self.latent_factor:
            raise ConfigError(f"model.image_size {self.image_size} is not a multiple of the autoencoder's factor "
                              f"{self.latent_factor}")
        side = self.space[1]
        layout = (self.layout_grid, self.layout_classes, self.layout_slots)
        if any(layout) and not (all(layout) and self.text_dim):
            raise ConfigError(f"model.layout_grid, layout_classes and layout_slots come from the data, all three on a "
                              f"text model or none; got {list(layout)} with text_dim {self.text_dim}")
        where = f"the latent side {side}" if self.latent_factor else f"model.image_size {side}"
        if self.backbone == "dit":
            if side % self.patch_size:
                raise ConfigError(f"{where} is not a multiple of model.patch {self.patch_size}")
            return
        if not 1 <= len(self.mults) <= 6 or any(not 1 <= m <= 16 for m in self.mults):
            raise ConfigError(f"model.mults must be 1 to 6 integers in 1..16, got {list(self.mults)}")
        if side % (self.multiple // (self.latent_factor or 1)):
            raise ConfigError(f"{where} is not a multiple of {self.multiple // (self.latent_factor or 1)} "
                              f"(needed by {len(self.mults)} resolutions in model.mults and model.unet_patch {self.unet_patch})")

    @property
    def patch_size(self) -> int:
        """The DiT's patch side: model.patch, or by what it sees (0)."""
        return self.patch or (2 if self.latent_factor else 4)

    @property
    def multiple(self) -> int:
        """What the backbone needs an image's H and W to be multiples of (canvases are padded up to it); in
        latent mode, times the autoencoder's factor."""
        backbone = self.patch_size if self.backbone == "dit" else self.unet_patch * 2 ** (len(self.mults) - 1)
        return backbone * (self.latent_factor or 1)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    layout = (cfg.layout_grid, cfg.layout_classes) if cfg.layout_grid else None
    channels = cfg.space[0]
    if cfg.backbone == "dit":
        return DiT(channels, cfg.dit_size, patch=cfg.patch_size, num_classes=cfg.num_classes, text_dim=cfg.text_dim,
                   layout=layout)
    return UNet(channels, cfg.width, cfg.mults, attention=cfg.attention, num_classes=cfg.num_classes,
                patch=cfg.unet_patch, text_dim=cfg.text_dim, text_levels=cfg.text_levels, text_positions=cfg.text_positions,
                layout=layout)


# --- inpainting canvases: the backbones take sizes that are multiples of `multiple` -------------------


def padded_canvas(image: torch.Tensor, mask: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(known, keep): the image N x C x H x W and 1 - mask (1 = keep), padded on the right and bottom to
    multiples of `multiple`; the padding is to be generated, then cropped off by `keep_known`."""
    h, w = image.shape[-2:]
    pad = (0, -w % multiple, 0, -h % multiple)
    return F.pad(image, pad), F.pad(1 - mask.float(), pad)


def keep_known(x: torch.Tensor, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The generated canvas x cropped to the image's size, with every kept pixel exactly the image's."""
    h, w = image.shape[-2:]
    return torch.where(keep[:, :, :h, :w].bool(), image, x[:, :, :h, :w].clamp(-1, 1))


# --- what the diffusion and flow families share -------------------------------------------------------


class BackboneFamily(Family):
    """A family that trains one backbone (`self.net`) with Adam. Its Config is a BackboneConfig with
    `lr`, `grad_clip` and `label_dropout`."""

    train_defaults = {"steps": 3000, "batch_size": 32, "ema_decay": 0.998, "sample_every": 1000}
    has_null_class = True   # class num_classes is the null class of classifier-free guidance

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        self.net = build_backbone(cfg)
        # Text -> layout, the first of the two stages (nets/layout.py); the backbone draws to its layout.
        self.layout_prior = (LayoutPrior(cfg.text_dim, cfg.layout_grid, cfg.layout_classes, cfg.layout_slots)
                             if cfg.layout_grid else None)
        # Latent mode: the autoencoder's frozen encoder and decoder (models/latent.py).
        self.latent = LatentSpace(cfg) if cfg.latent_factor else None

    @classmethod
    def fit_config(cls, cfg, dataset):
        """Captioned data makes a text network, with no flag to set; its captions, not its classes (which
        captioned:SOURCE data still has, for evaluation), condition it."""
        cfg = super().fit_config(cfg, dataset)
        if cfg.autoencoder:   # latent mode: the autoencoder's shape, hash and the latents' scale
            cfg = latent_mode.fit(cfg, dataset)
        if getattr(dataset, "captioned", False):
            grid = getattr(dataset, "layout_grid", 0) if cfg.grounded else 0
            return replace(cfg, num_classes=0, text_dim=TEXT_DIM, text_encoder=encoder_id(), layout_grid=grid,
                           layout_classes=dataset.layout_classes if grid else 0,
                           layout_slots=dataset.layout_order.shape[1] if grid else 0)
        return replace(cfg, text_dim=0, text_encoder="", layout_grid=0, layout_classes=0, layout_slots=0)

    def ready(self, dataset, log=print) -> None:
        """A text network's caption embeddings, and in latent mode the data's cached latents, attached to
        the dataset's batches."""
        super().ready(dataset, log)
        if self.reads_text:
            dataset.load_text(log=log, short=self.cfg.caption_short > 0)
        if self.latent is not None:
            ae, sha = latent_mode.open_autoencoder(self.cfg.autoencoder)
            dataset.attach("latent", latent_mode.cached_latents(ae, sha, dataset, log))

    def training_images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the backbone learns from a batch: its images, or in latent mode their unit-variance latents
        (cached, `ready`; encoded here when the batch has none)."""
        if self.latent is None:
            return batch["image"]
        if "latent" in batch:
            return self.latent.scaled(batch["latent"])
        with torch.no_grad():
            return self.latent.encode(batch["image"], lambda fn, x: fn(x))

    def space_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The shape the backbone works at for an image of height x width: the image's, or its latent's."""
        if self.latent is None:
            return self.cfg.channels, height, width
        f = self.cfg.latent_factor
        return self.cfg.latent_channels, height // f, width // f

    def to_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images N x C x H x W -> what the backbone works on (latent mode: their latents)."""
        return images if self.latent is None else self.latent.encode(images, self.run)

    def from_space(self, x: torch.Tensor) -> torch.Tensor:
        """What the backbone made -> images in [-1, 1] (latent mode: decoded)."""
        return x.clamp(-1, 1) if self.latent is None else self.latent.decode(x, self.run)

    def pixels_only(self, what: str) -> None:
        """Refuse what a latent model cannot do yet, naming it."""
        if self.latent is not None:
            raise ConfigError(f"{what} of a latent model (model.autoencoder) is not supported: {self.name} learns the "
                              f"autoencoder's latents, not pixels")

    @property
    def reads_text(self) -> bool:
        return self.cfg.text_dim > 0

    @property
    def draws_layouts(self) -> bool:
        return self.layout_prior is not None

    def network_spec(self, outputs: list[str], usage: str, metadata: dict[str, str], *, time_scale: float = 1.0,
                     time_steps: int = 0) -> ExportSpec:
        """One call of the backbone as a graph: x, time [+ label] [+ text] -> outputs; the family's sampler
        runs outside it, over the metadata's settings."""
        self.pixels_only("export")
        conditional = self.conditional
        text = ["text_pooled", "text_tokens", "text_mask"] if self.reads_text else []

        def fn(x, t, *rest):
            y = rest[0] if conditional else None
            extra = list(rest[1 if conditional else 0:])
            return self.net(x, t * time_scale if time_scale != 1.0 else t, y, *extra)

        meta = {"imagegen.sample_steps": str(self.cfg.sample_steps), "imagegen.guidance": str(self.cfg.guidance),
                "imagegen.null_class": str(self.num_classes) if conditional else "", **metadata}
        if text:
            usage += ("; a prompt is text_pooled, text_tokens and text_mask from all-MiniLM-L6-v2 (imagegen/text.py), "
                      "the null text an all-false mask")
        # "time", not "t": the exporter names a folded weight.t() "t", and an input may not share its name.
        return ExportSpec(fn, ["x", "time"] + (["label"] if conditional else []) + text, outputs, usage, meta,
                          time_steps)

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        opts = {"net": adam(self.net.parameters(), self.cfg.lr)}
        if self.layout_prior is not None:
            opts["layout"] = adam(self.layout_prior.parameters(), self.cfg.lr)
        return opts

    def training_labels(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor | None:
        """The batch's labels with a `label_dropout` share replaced by the null class (None when
        unconditional): one network learns both, for classifier-free guidance."""
        if not self.conditional:
            return None
        labels = batch["label"]
        drop = torch.rand(labels.shape[0], generator=gen, device=labels.device) < self.cfg.label_dropout
        return torch.where(drop, self.num_classes, labels)

    def training_text(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
        """The network's text inputs for a training batch ([] for a network without text): the batch's
        caption embeddings, a `caption_short` share of them its captions' first phrases, with a
        `label_dropout` share replaced by the null text (all zeros, empty mask),
        and for a grounded network the true layouts, null where the caption was dropped."""
        if not self.reads_text:
            return []
        pooled, tokens, mask = batch["text_pooled"], batch["text_tokens"], batch["text_mask"]
        keep = torch.rand(mask.shape[0], generator=gen, device=mask.device) >= self.cfg.label_dropout
        if self.cfg.caption_short:   # drawn only when asked: a run without it keeps its random stream
            cut = torch.rand(mask.shape[0], generator=gen, device=mask.device) < self.cfg.caption_short
            t = max(tokens.shape[1], batch["short_tokens"].shape[1])   # each table is padded to its longest
            pooled = torch.where(cut[:, None], batch["short_pooled"], pooled)
            tokens = torch.where(cut[:, None, None], pad_tokens(batch["short_tokens"], t), pad_tokens(tokens, t))
            mask = torch.where(cut[:, None], pad_tokens(batch["short_mask"], t), pad_tokens(mask, t))
        words = [pooled * keep[:, None], tokens * keep[:, None, None], mask & keep[:, None]]
        if self.layout_prior is None:
            return words
        return [*words, torch.where(keep[:, None], batch["layout"], self.cfg.layout_classes)]

    def prepare(self, dataset, steps: int | None = None) -> None:
        """A grounded model's first stage: the layout prior alone, `layout_epochs` passes over the data in
        random batches (a generator of its own), before the backbone starts; no more than
        LAYOUT_UPDATES_PER_STEP updates per step of the run's budget `steps` (at least LAYOUT_MIN_UPDATES)."""
        super().prepare(dataset, steps)
        if self.latent is not None:   # a new run starts from the autoencoder run's weights
            ae, sha = latent_mode.open_autoencoder(self.cfg.autoencoder)
            if sha != self.cfg.autoencoder_sha256:
                raise ConfigError(f"model.autoencoder {self.cfg.autoencoder!r} changed while the run was set up")
            self.latent.adopt(ae)
        updates = math.ceil(self.cfg.layout_epochs * len(dataset) / LAYOUT_BATCH) if self.layout_prior is not None else 0
        if steps is not None:
            updates = min(updates, max(LAYOUT_MIN_UPDATES, LAYOUT_UPDATES_PER_STEP * steps))
        if not updates:
            return
        from tqdm import tqdm
        gen = torch.Generator().manual_seed(0)
        opt = adam(self.layout_prior.parameters(), self.cfg.lr)
        for _ in tqdm(range(updates), desc="first stage: the layout prior alone", unit="update", leave=False,
                      disable=None, mininterval=1.0):
            rows = torch.randint(len(dataset), (LAYOUT_BATCH,), generator=gen)
            batch = {k: v.to(self.device) for k, v in dataset.batch(rows).items()}
            opt.zero_grad(set_to_none=True)
            self.layout_loss(batch).backward()
            self._clipped_step(self.layout_prior, opt)

    def layout_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The layout prior's cross-entropy on the batch's captions and true layouts (None without one)."""
        if self.layout_prior is None:
            return None
        return self.layout_prior.loss(batch["text_pooled"], batch["text_tokens"], batch["text_mask"], batch["layout"],
                                      batch["layout_order"])

    def ground(self, text: TextEmbedding | None, generator: Generators, draw: bool = True) -> TextEmbedding | None:
        """The prompts with their layouts drawn by the layout prior (a grounded model; others: as given).
        Each image's layout comes from one uniform per slot of its own generator, drawn before its noise,
        or, with `draw` False, is the most likely layout (from_noise: a deterministic map of the noise). A
        text that already has its layouts keeps them."""
        if text is None or self.layout_prior is None or text.layout is not None:
            return text
        n = len(text)
        u = per_item_uniform(n, (self.layout_prior.slots,), generator, self.device) if draw else None
        words = text.padded(MAX_TOKENS)
        with eval_mode(self):
            layout = self.layout_prior.sample(words.pooled, words.tokens, words.mask, u,
                                              run=self.run)
        return text.with_layout(layout)

    def prompts(self, n: int, text: TextEmbedding | None, negative: TextEmbedding | None, generator: Generators,
                draw: bool = True) -> tuple[TextEmbedding | None, TextEmbedding | None]:
        """A sampling call's prompt and negative prompt, checked (check_text), and a grounded model's
        layouts for the prompt (`ground`: drawn from each image's generator before its noise, or with
        `draw` False the most likely ones)."""
        text, negative = self.check_text(n, text), self.check_text(n, negative, "negative prompt")
        return self.ground(text, generator, draw=draw), negative

    def canvas(self, image: torch.Tensor, mask: torch.Tensor, generator: Generators):
        """(image, known, keep, noise) for inpainting images N x C x H x W where mask N x 1 x H x W is 1:
        the image on the model's device, the canvas padded to the backbone's multiple (padded_canvas;
        keep = 1 where a pixel is kept) and its per-image noise."""
        image = image.to(self.device)
        known, keep = padded_canvas(image, mask.to(self.device), self.cfg.multiple)
        return image, known, keep, self._noise(image.shape[0], self.space_shape(*known.shape[-2:]), generator)

    def check_text(self, n: int, text: TextEmbedding | None, what: str = "prompt") -> TextEmbedding | None:
        """A sampling call's text, checked: n rows for a text network, refused by any other."""
        if text is None:
            return None
        if not self.reads_text:
            raise ConfigError(f"this {self.name} model was not trained on captions: it takes no {what}")
        if len(text) != n:
            raise ConfigError(f"got {len(text)} {what}s for {n} images")
        return text.to(self.device)

    def update(self, opt: dict, loss: torch.Tensor, batch: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Backward, clip the global gradient norm to `grad_clip` (0 = off), step. With the batch, a
        grounded model's layout prior learns from it in the same step (its own optimizer and clip)."""
        prior = None if batch is None else self.layout_loss(batch)
        total = loss if prior is None else loss + prior
        for o in opt.values():
            o.zero_grad(set_to_none=True)
        self.backward(total)
        self._clipped_step(self.net, opt["net"])
        if prior is not None:
            self._clipped_step(self.layout_prior, opt["layout"])
        return {"loss": loss.item()} | ({} if prior is None else {"layout": prior.item()})

    def _clipped_step(self, module: nn.Module, opt) -> None:
        """Clip the module's global gradient norm to `grad_clip` (0 = off), then step its optimizer."""
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.grad_clip)
        opt.step()

    def guided(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance: float,
               text: TextEmbedding | None = None, negative: TextEmbedding | None = None) -> torch.Tensor:
        """The network's output for x N x C x H x W at times t (N), with classifier-free guidance:
        out_null + guidance (out_cond - out_null), where the condition is the labels and/or the text, and
        the null branch has the null class and the `negative` text (a negative prompt) or the null text.
        Without labels or text, the null branch alone. The network always runs in fixed micro-batches,
        and a text always has MAX_TOKENS token slots, so a seed's image does not depend on its batch."""
        n, n_cls = x.shape[0], self.num_classes
        if labels is not None and labels.shape[0] != n:
            raise ValueError(f"network call on {n} images with {labels.shape[0]} labels")
        null = torch.full((n,), n_cls, device=x.device, dtype=torch.long) if n_cls else None
        cond = labels if labels is not None and n_cls else null

        def run(branches: list[tuple[torch.Tensor | None, TextEmbedding | None]]) -> torch.Tensor:
            k = len(branches)
            xs, ts = (x, t) if k == 1 else (torch.cat([x] * k), torch.cat([t] * k))
            y = None if not n_cls else branches[0][0] if k == 1 else torch.cat([b[0] for b in branches])
            extra = []
            if self.reads_text:
                words = TextEmbedding.cat([TextEmbedding.null(n, MAX_TOKENS, x.device) if b[1] is None else b[1]
                                           for b in branches]).padded(MAX_TOKENS)
                extra = [words.pooled, words.tokens, words.mask]
                if self.layout_prior is not None:   # the null branch (and a negative prompt) draws to no layout
                    null_layout = torch.full((n, self.layout_prior.cells), self.cfg.layout_classes, device=x.device)
                    extra.append(torch.cat([null_layout if b[1] is None or b[1].layout is None or i else b[1].layout
                                            for i, b in enumerate(branches)]))
            return self.run(self.net, xs, ts, y, *extra)

        if cond is null and text is None:
            return run([(null, None)])
        if guidance == 1.0:
            return run([(cond, text)])
        both = run([(cond, text), (null, negative)])
        out, out_null = both[:n], both[n:]
        return out_null + guidance * (out - out_null)

    def _noise(self, n: int, shape: tuple[int, ...], generator: Generators) -> Noise:
        return lambda: per_item_normal(n, shape, generator, self.device)
