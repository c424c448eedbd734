"""The denoising backbone of the diffusion and flow families, chosen by `model.backbone`: the U-Net
(nets/unet.py) or the diffusion transformer (nets/dit.py). A family owns its objective and sampler; this
module holds the config fields both families share, builds the network they name, and (`BackboneFamily`)
the parts of training and sampling that do not depend on the objective: the optimizer and its step,
label dropout for guidance, the guided network call, per-image noise, inpainting canvases.

Both networks map (x N x C x H x W, t N, y N or None) -> N x C x H x W and start at zero output; a text
network (model.text_dim > 0, set when the training data has captions) also takes a text as three tensors
(pooled, tokens, mask: imagegen/text.py), and a caption dropped to the null text trains guidance as a
dropped label does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_IMAGE_SIZE, MAX_WIDTH, ranged
from ..errors import ConfigError
from ..nets.dit import DiT
from ..nets.unet import UNet
from ..solvers import Noise
from ..text import DIM as TEXT_DIM
from ..text import MAX_TOKENS, TextEmbedding, encoder_id
from .base import Family, Generators, adam, per_item_normal, run_fixed_batch


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
    patch: int = ranged(4, 1, 16)   # 4: 49 tokens at 28 px, a quarter of the cost per step of 2 (75 against 285 ms)
    # Text conditioning, filled in from the data: the encoder's width when it has captions, and its name.
    text_dim: int = ranged(0, 1, 4096, zero="no text")
    text_encoder: str = ""
    # U-Net: the lowest resolutions whose blocks are each followed by cross-attention to the text (0: only
    # the one in the middle, as runs saved before this field had).
    text_levels: int = ranged(2, 0, 6)
    text_positions: bool = True   # U-Net: each cross-attention's queries carry a 2-D position code

    def validate_backbone(self) -> None:
        if self.backbone == "dit":
            if self.image_size % self.patch:
                raise ConfigError(f"model.image_size {self.image_size} is not a multiple of model.patch {self.patch}")
            return
        if not 1 <= len(self.mults) <= 6 or any(not 1 <= m <= 16 for m in self.mults):
            raise ConfigError(f"model.mults must be 1 to 6 integers in 1..16, got {list(self.mults)}")
        if self.image_size % self.multiple:
            raise ConfigError(f"model.image_size {self.image_size} is not a multiple of {self.multiple} "
                              f"(needed by {len(self.mults)} resolutions in model.mults and model.unet_patch {self.unet_patch})")

    @property
    def multiple(self) -> int:
        """What the backbone needs H and W to be multiples of (canvases are padded up to it)."""
        return self.patch if self.backbone == "dit" else self.unet_patch * 2 ** (len(self.mults) - 1)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    if cfg.backbone == "dit":
        return DiT(cfg.channels, cfg.dit_size, patch=cfg.patch, num_classes=cfg.num_classes, text_dim=cfg.text_dim)
    return UNet(cfg.channels, cfg.width, cfg.mults, attention=cfg.attention, num_classes=cfg.num_classes,
                patch=cfg.unet_patch, text_dim=cfg.text_dim, text_levels=cfg.text_levels, text_positions=cfg.text_positions)


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

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        self.net = build_backbone(cfg)

    @classmethod
    def fit_config(cls, cfg, dataset):
        """Captioned data makes a text network, with no flag to set; its captions, not its classes (which
        captioned:SOURCE data still has, for evaluation), condition it."""
        cfg = super().fit_config(cfg, dataset)
        if getattr(dataset, "captioned", False):
            return replace(cfg, num_classes=0, text_dim=TEXT_DIM, text_encoder=encoder_id())
        return replace(cfg, text_dim=0, text_encoder="")

    @property
    def reads_text(self) -> bool:
        return self.cfg.text_dim > 0

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        return {"net": adam(self.net.parameters(), self.cfg.lr)}

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
        caption embeddings with a `label_dropout` share replaced by the null text (all zeros, empty mask)."""
        if not self.reads_text:
            return []
        mask = batch["text_mask"]
        keep = torch.rand(mask.shape[0], generator=gen, device=mask.device) >= self.cfg.label_dropout
        return [batch["text_pooled"] * keep[:, None], batch["text_tokens"] * keep[:, None, None], mask & keep[:, None]]

    def check_text(self, n: int, text: TextEmbedding | None, what: str = "prompt") -> TextEmbedding | None:
        """A sampling call's text, checked: n rows for a text network, refused by any other."""
        if text is None:
            return None
        if not self.reads_text:
            raise ConfigError(f"this {self.name} model was not trained on captions: it takes no {what}")
        if len(text) != n:
            raise ConfigError(f"got {len(text)} {what}s for {n} images")
        return text.to(self.device)

    def update(self, opt: dict, loss: torch.Tensor) -> dict[str, float]:
        """Backward, clip the global gradient norm to `grad_clip` (0 = off), step."""
        opt["net"].zero_grad(set_to_none=True)
        self.backward(loss)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        opt["net"].step()
        return {"loss": loss.item()}

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
            return run_fixed_batch(self.net, xs, ts, y, *extra, owner=self)

        if cond is null and text is None:
            return run([(null, None)])
        if guidance == 1.0:
            return run([(cond, text)])
        both = run([(cond, text), (null, negative)])
        out, out_null = both[:n], both[n:]
        return out_null + guidance * (out - out_null)

    def _noise(self, n: int, shape: tuple[int, ...], generator: Generators) -> Noise:
        return lambda: per_item_normal(n, shape, generator, self.device)
