"""The in-memory dataset every source produces, and its batching.

Images are held as one uint8 tensor (N x C x H x W), so a batch is one index operation and one
conversion to float in [-1, 1]: no per-item Python work, no DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageDataset:
    images: torch.Tensor            # N x C x H x W, uint8
    labels: torch.Tensor            # N, int64; -1 where the source has no labels
    classes: list[str]              # class names, index = label; empty when unlabelled
    name: str                       # the --data spec that made it
    source: str                     # where the files came from, for `data info` and the report
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of bad files
    notes: list[str] = field(default_factory=list)                # what loading changed (e.g. channel conversions)
    captions: list[str] = field(default_factory=list)             # one per image (text-to-image data), or none
    # A ground-truth layout per captioned image (nets/layout.py), where the source has one (`scenes`):
    # N x layout_grid^2 cell classes in reading order, 0 empty, < layout_classes; and N x S cells of the
    # objects in the order the caption names them, -1 after the last.
    layout: torch.Tensor | None = field(default=None, repr=False)
    layout_order: torch.Tensor | None = field(default=None, repr=False)
    layout_grid: int = 0
    layout_classes: int = 0
    # A prepared store's file (data/store.Mapping) when `images` is a view of its memory map: batch()
    # reads through it, so the pages stay in the page cache rather than resident in this process.
    mapping: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")
        if self.captions and len(self.captions) != self.images.shape[0]:
            raise ValueError(f"got {len(self.captions)} captions for {self.images.shape[0]} images")
        if self.layout is not None and (self.layout.shape != (self.images.shape[0], self.layout_grid ** 2)
                                        or not self.captions or int(self.layout.max()) >= self.layout_classes
                                        or self.layout_order is None or self.layout_order.shape[0] != self.images.shape[0]):
            raise ValueError(f"layout must be N x {self.layout_grid ** 2} classes below {self.layout_classes}, one "
                             f"row per captioned image, with the order of its objects; got {tuple(self.layout.shape)}")

    @property
    def captioned(self) -> bool:
        return bool(self.captions)

    def load_text(self, log=print, short: bool = False) -> None:
        """Encode the captions (once per distinct caption, cached: imagegen/text.caption_table), so that
        every batch carries its captions' embeddings: text_pooled N x D, text_tokens N x T x D, text_mask
        N x T; with `short`, also their first phrases' (text.first_phrase) as short_pooled, short_tokens
        and short_mask. For text networks; other families never pay for the encoder."""
        from ..text import caption_table, first_phrase
        if self.captioned and getattr(self, "_text", None) is None:
            self._text = caption_table(self.captions, log=log)
        if short and self.captioned and getattr(self, "_short", None) is None:
            self._short = caption_table([first_phrase(c) for c in self.captions], log=log)

    def attach(self, key: str, values: torch.Tensor) -> None:
        """Per-image tensors (N x ...) that every batch carries under `key`, e.g. a latent model's cached
        latents (models/latent.py)."""
        if values.shape[0] != len(self):
            raise ValueError(f"{key}: {values.shape[0]} rows for {len(self)} images")
        self._attached = {**getattr(self, "_attached", {}), key: values}

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        return self.images.shape[2]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def class_counts(self) -> list[int]:
        if not self.labelled:
            return []
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The items at `index` as {"image": float N x C x H x W in [-1, 1], "label": long N}, with the
        text (load_text) and the layouts where the data has them."""
        raw = self.images[index] if self.mapping is None else self.mapping.gather(index)
        image = raw.float().div_(127.5).sub_(1.0)
        out = {"image": image, "label": self.labels[index]}
        if self.layout is not None:
            out.update(layout=self.layout[index], layout_order=self.layout_order[index])
        for key in ("text", "short"):   # after load_text()
            if getattr(self, f"_{key}", None) is not None:
                table, rows = getattr(self, f"_{key}")
                words = table[rows[index]]
                out.update({f"{key}_pooled": words.pooled, f"{key}_tokens": words.tokens, f"{key}_mask": words.mask})
        for key, values in getattr(self, "_attached", {}).items():
            out[key] = values[index]
        return out

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self) // batch_size)

    def batch_at(self, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """The batch for training step `step` (0-based).

        Each epoch is a fresh permutation drawn from a generator seeded by (seed, epoch), and the last
        incomplete batch is dropped, so the batch depends only on (seed, step): resume is exact without
        saving any sampler state.
        """
        spe = self.steps_per_epoch(batch_size)
        epoch, pos = divmod(step, spe)
        if batch_size > len(self):
            # Tiny datasets: draw with replacement rather than refuse to train.
            g = torch.Generator().manual_seed(mix_seed(seed, epoch))
            return self.batch(torch.randint(len(self), (batch_size,), generator=g))
        perm = self._permutation(seed, epoch)
        return self.batch(perm[pos * batch_size:(pos + 1) * batch_size])

    def _permutation(self, seed: int, epoch: int) -> torch.Tensor:
        key = (seed, epoch)
        cached = getattr(self, "_perm_cache", None)
        if cached is None or cached[0] != key:
            g = torch.Generator().manual_seed(mix_seed(seed, epoch))
            cached = (key, torch.randperm(len(self), generator=g))
            self._perm_cache = cached
        return cached[1]


def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64-style), so nearby inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


def norm_name(name: str) -> str:
    """A class or domain name for matching: lower case, letters and digits only ('Ankle boot' = 'ankle-boot')."""
    return "".join(ch for ch in name.lower() if ch.isalnum())
