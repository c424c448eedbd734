"""Two unpaired image domains for translation models (CycleGAN): `--data pair:...`.

    pair:DIR                              DIR/trainA, DIR/trainB (and testA, testB for --split test),
                                          the layout of the CycleGAN datasets
    pair:fashion-mnist:sneaker,ankle-boot two classes of a labelled source (names or indices), one per domain
    pair:shapes:circle,square

Batches are {"a": float N x C x H x W, "b": float N x C x H x W} in [-1, 1], drawn independently from
each domain: the pairs mean nothing, which is the point of unpaired translation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .dataset import ImageDataset, mix_seed, norm_name
from .folder import guess_channels, list_images, load_folder

SPLIT_FOLDERS = {"train": ("trainA", "trainB"), "test": ("testA", "testB")}


@dataclass
class PairedDataset:
    a: ImageDataset
    b: ImageDataset
    domains: tuple[str, str]           # names of domain A and domain B
    name: str                          # the --data spec that made it
    source: str
    base: str | None = None            # the labelled source the domains were cut from ("fashion-mnist"), if any
    base_classes: tuple[int, int] | None = None  # the domains' class indices in that source
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.a.images.shape[1:] != self.b.images.shape[1:]:
            raise ValueError(f"domains differ in shape: {tuple(self.a.images.shape[1:])} vs {tuple(self.b.images.shape[1:])}")

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    @property
    def size(self) -> int:
        return self.a.size

    @property
    def channels(self) -> int:
        return self.a.channels

    @property
    def labelled(self) -> bool:
        return False             # the domains are the structure; there are no classes to condition on

    @property
    def classes(self) -> list[str]:
        return []

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.a.skipped + self.b.skipped

    def batch_at(self, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """Unpaired: each domain walks its own permutations (seeded differently), dropping its last
        incomplete batch, so the batch depends only on (seed, step) and resume stays exact."""
        return {"a": self.a.batch_at(step, batch_size, seed)["image"],
                "b": self.b.batch_at(step, batch_size, mix_seed(seed, 0xB))["image"]}

    def labelled_view(self) -> ImageDataset:
        """Both domains as one labelled dataset (label 0 = A, 1 = B): what a domain classifier trains on."""
        return ImageDataset(images=torch.cat([self.a.images, self.b.images]),
                            labels=torch.cat([torch.zeros(len(self.a), dtype=torch.long), torch.ones(len(self.b), dtype=torch.long)]),
                            classes=list(self.domains), name=self.name, source=self.source, skipped=self.skipped)


def class_index(name: str, classes: list[str], what: str) -> int:
    """A class given by name (case and punctuation ignored) or index -> its index; ConfigError otherwise."""
    if name.strip().isdigit() and int(name) < len(classes):
        return int(name)
    by_name = {norm_name(c): i for i, c in enumerate(classes)}
    if norm_name(name) not in by_name:
        raise ConfigError(f"{what}: unknown class {name.strip()!r} (classes: {', '.join(classes)})")
    return by_name[norm_name(name)]


def split_spec(arg: str, known_sources: set[str]) -> tuple[str, str] | None:
    """'fashion-mnist:sneaker,ankle-boot' -> ('fashion-mnist', 'sneaker,ankle-boot'); None for a folder."""
    kind = arg.partition(":")[0]
    if kind in known_sources and ":" in arg:
        base, _, pair = arg.rpartition(":")
        return base, pair
    return None


def from_classes(spec: str, base: ImageDataset, pair: str, limit: int) -> PairedDataset:
    """Two classes of a labelled dataset as domains A and B."""
    if not base.labelled:
        raise ConfigError(f"--data {spec!r}: {base.name!r} has no classes to make domains from")
    names = [p for p in pair.split(",")]
    if len(names) != 2 or not all(n.strip() for n in names):
        raise ConfigError(f"--data {spec!r}: give two classes, as pair:{base.name}:CLASS_A,CLASS_B")
    ia, ib = (class_index(n, base.classes, f"--data {spec!r}") for n in names)
    if ia == ib:
        raise ConfigError(f"--data {spec!r}: both domains are class {base.classes[ia]!r}; pick two different classes")

    def domain(i: int) -> ImageDataset:
        keep = (base.labels == i).nonzero().flatten()
        if limit:
            keep = keep[:limit]
        if len(keep) == 0:
            raise DataError(f"--data {spec!r}: class {base.classes[i]!r} has no images in this split")
        return ImageDataset(images=base.images[keep].contiguous(), labels=torch.full((len(keep),), -1, dtype=torch.long),
                            classes=[], name=f"{base.name}:{base.classes[i]}", source=base.source)

    return PairedDataset(domain(ia), domain(ib), (base.classes[ia], base.classes[ib]), spec, base.source,
                         base=base.name, base_classes=(ia, ib))


def from_folders(spec: str, root: str, split: str, size: int, channels: int, limit: int) -> PairedDataset:
    """The CycleGAN layout: root/trainA, root/trainB (testA, testB for the test split)."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"--data {spec!r}: {root_path} is not a folder")
    folders = [root_path / f for f in SPLIT_FOLDERS[split]]
    missing = [f"{f.name}/" for f in folders if not f.is_dir()]
    if missing:
        raise DataError(f"--data {spec!r}: no {' or '.join(missing)} in {root_path} "
                        f"(expected trainA/, trainB/, testA/, testB/ of images)")
    listed = [list_images(f, classes=False)[0] for f in folders]
    for f, files in zip(folders, listed):
        if not files:
            raise DataError(f"--data {spec!r}: domain folder {f} is empty (no .png, .jpg or .webp images)")
    # One channel count for both domains: the data config's, else colour if either domain has colour.
    channels = channels or max(guess_channels(files) for files in listed)
    notes, domains = [], []
    for f in folders:
        images, _, _, skipped, converted, _ = load_folder(f, size, channels, classes=False)
        if converted:
            notes.append(f"{f}: {len(converted)} image(s) with another channel count converted to {channels} "
                         f"channel(s), e.g. {converted[0]}")
        if limit:
            images = images[:limit]
        domains.append(ImageDataset(images=images, labels=torch.full((len(images),), -1, dtype=torch.long), classes=[],
                                    name=f"{spec}/{f.name}", source=str(f), skipped=skipped))
    return PairedDataset(domains[0], domains[1], ("A", "B"), spec, str(root_path), notes=notes)
