"""Data sources by name: `--data fashion-mnist | mnist | kmnist | cifar10 | cifar100 | idx:DIR | folder:PATH |
zip:PATH (an EDM / StyleGAN2-ADA dataset.zip: data/edmzip.py) | store:DIR (a prepared store: data/store.py) |
shapes | scenes | emoji[:DIR]` (Debian's EmojiOne icons, captioned: data/emoji.py),
`captioned:SOURCE` (a labelled source with captions made from its classes: data/captions.py), and for
translation models two domains: `pair:DIR | pair:SOURCE:CLASS_A,CLASS_B` (data/paired.py).

Named IDX datasets are looked for in $IMAGEGEN_DATA/<name>, imagegen's cache ($IMAGEGEN_CACHE/<name>)
and /usr/share/datasets/<name> (Debian's dataset packages), in that order; failing that they are
downloaded from their canonical source into the user cache, checked against a pinned SHA-256.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import MAX_IMAGE_SIZE, Range, cache_path, ranged, validate
from ..errors import ConfigError, DataError, DownloadError
from . import folder as folder_source
from . import idx as idx_source
from . import paired
from .captions import class_captions
from .cifar import CIFAR_DATASETS, load_cifar
from .edmzip import scan_zip
from .emoji import load_emoji
from .store import open_store
from . import scenes as scenes_source
from . import shapes as shapes_source
from .dataset import ImageDataset
from .paired import PairedDataset
from .download import download
from . import locate
from .locate import expand_source


HELD_OUT = Range(0.0, 0.5, kind=float, lo_open=True, zero="none: the test split is the training images")


@dataclass
class DataConfig:
    source: str = "shapes"        # the --data spec
    split: str = "train"          # "train" or "test"
    # image side in pixels; 0 = the source's own (28 for IDX, 32 for shapes, 64 for folders)
    size: int = ranged(0, 8, MAX_IMAGE_SIZE, zero="the source's own")
    channels: int = ranged(0, 1, 3, zero="the source's own")   # 1 or 3 (validate refuses 2)
    limit: int = ranged(0, 1, 2**31 - 1, zero="all")   # use only the first N images; handy for quick runs
    strict: bool = False          # any bad file is an error instead of a reported skip
    # The share of a folder's or zip's images kept out of training as its test split (the validation
    # loss, `evaluate`'s reference and memorisation check), chosen by a hash of each file's name: a file
    # stays on its side as images are added. 0: no test split of its own, the test split is the training
    # images. Sources with their own test split (emoji, fashion-mnist...) take none.
    held_out: float = ranged(0.0, HELD_OUT)

    def __post_init__(self) -> None:
        self.source = expand_source(self.source)   # so the run's config.json names the real path

    @classmethod
    def as_saved(cls, saved: dict, split: str = "train", source: str | None = None) -> "DataConfig":
        """The images of a run's config.json data section `saved` (its source, or `source` in its place;
        size, channels, held-out share) in `split`: what evaluation, prompts and distillation read. A field
        it lacks has its default, as when the run's config is read."""
        return cls(source=source or saved.get("source", cls.source), split=split, size=int(saved.get("size", 0)),
                   channels=int(saved.get("channels", 0)), held_out=float(saved.get("held_out", 0)))

    def validate(self) -> None:
        if self.split not in ("train", "test"):
            raise ConfigError(f"data.split must be 'train' or 'test', got {self.split!r}")
        if self.channels not in (0, 1, 3):
            raise ConfigError(f"data.channels must be 0, 1 or 3, got {self.channels}")
        if self.held_out and self.source.removeprefix("captioned:").partition(":")[0] not in HELD_OUT_SOURCES:
            raise ConfigError(f"data.held_out splits a folder: or zip: source, which has no test split of its own; "
                              f"{self.source!r} is neither (set data.held_out = 0)")


HELD_OUT_SOURCES = ("folder", "zip")   # the sources data.held_out splits


@dataclass(frozen=True)
class IDXDataset:
    name: str
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]
    sha256: dict  # file name (.gz) -> SHA-256 of the file served by the mirrors


# The SHA-256 values are those of the canonical .gz files as published by each dataset's authors.
IDX_DATASETS = {
    "fashion-mnist": IDXDataset(
        "fashion-mnist",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
    ),
    "mnist": IDXDataset(
        "mnist",
        tuple(str(i) for i in range(10)),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    ),
    "kmnist": IDXDataset(
        "kmnist",
        ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        {
            "train-images-idx3-ubyte.gz": "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
            "train-labels-idx1-ubyte.gz": "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
            "t10k-images-idx3-ubyte.gz": "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
            "t10k-labels-idx1-ubyte.gz": "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
        },
    ),
}


def locate_idx(spec: IDXDataset, split: str, *, allow_download: bool = True) -> tuple[Path, Path]:
    """(images file, labels file) for a named IDX dataset, downloading into the cache if needed."""
    stems = (idx_source.IMAGES_FILE[split], idx_source.LABELS_FILE[split])
    for d in locate.search_dirs(spec.name):
        found = [idx_source.find_idx_file(d, s) for s in stems]
        if all(found):
            return found[0], found[1]
    if not allow_download:
        raise DataError(f"{spec.name}: not found in {', '.join(map(str, locate.search_dirs(spec.name)))}")
    target = cache_path(spec.name)
    paths = []
    for stem in stems:
        fname = stem + ".gz"
        dest = target / fname
        if not dest.exists():
            errors = []
            for mirror in spec.mirrors:
                try:
                    download(mirror + fname, dest, spec.sha256[fname])
                    break
                except DownloadError as e:
                    errors.append(str(e))
            else:
                raise DataError(
                    f"{spec.name}: not found in {', '.join(map(str, locate.search_dirs(spec.name)))} and the download "
                    f"failed: {'; '.join(errors)}"
                )
        paths.append(dest)
    return paths[0], paths[1]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 N x C x H x W to size x size (antialiased bilinear), only when needed."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _set_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if channels == 0 or images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # ITU-R 601 luma, as PIL's "L" conversion uses.
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)


def load_data(cfg: DataConfig | str) -> ImageDataset | PairedDataset:
    """Load a data source into memory. Bad files are reported in `.skipped` (or raise under strict).
    `pair:` sources give a PairedDataset of two unpaired domains (data/paired.py)."""
    if isinstance(cfg, str):
        cfg = DataConfig(source=cfg)
    validate(cfg, "data")
    spec = cfg.source
    kind, _, arg = spec.partition(":")
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    captions: list[str] = []
    layout, order, grid, layout_classes = None, None, 0, 0
    mapping = None
    if kind == "pair":
        return _load_pair(cfg, arg)
    if kind == "captioned":   # a labelled source with a caption per image from its class (data/captions.py)
        base = load_data(replace(cfg, source=arg))
        if isinstance(base, PairedDataset) or not base.labelled:
            raise ConfigError(f"--data {spec!r}: captions are made from classes; {arg!r} has none "
                              f"(use a labelled source, e.g. captioned:fashion-mnist)")
        return replace(base, name=spec, captions=class_captions(base.labels.tolist(), base.classes,
                                                                 seed=0 if cfg.split == "train" else 1))
    if kind in IDX_DATASETS:
        if arg:
            raise ConfigError(f"--data {spec!r}: {kind} takes no argument")
        ds_spec = IDX_DATASETS[kind]
        img_path, lbl_path = locate_idx(ds_spec, cfg.split)
        images, labels = idx_source.read_idx_pair(img_path, lbl_path, len(ds_spec.classes))
        classes, source = list(ds_spec.classes), f"{img_path.parent}"
    elif kind in CIFAR_DATASETS:
        if arg:
            raise ConfigError(f"--data {spec!r}: {kind} takes no argument")
        images, labels, classes, source = load_cifar(kind, cfg.split)
    elif kind == "idx":
        if not arg:
            raise ConfigError("--data idx:DIR needs a directory")
        d = Path(arg)
        if not d.is_dir():
            raise DataError(f"{d}: not a directory")
        paths = [idx_source.find_idx_file(d, s) for s in (idx_source.IMAGES_FILE[cfg.split], idx_source.LABELS_FILE[cfg.split])]
        if not paths[0]:
            raise DataError(f"{d}: no {idx_source.IMAGES_FILE[cfg.split]}[.gz]")
        if paths[1]:
            images, labels = idx_source.read_idx_pair(paths[0], paths[1], None)
            classes = [str(i) for i in range(int(labels.max()) + 1)]
            names_file = d / "classes.txt"   # optional class names, one per line (written by `imagegen synth`)
            if names_file.is_file():
                names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
                if len(names) < len(classes):
                    raise DataError(f"{names_file}: {len(names)} names for {len(classes)} classes")
                classes = names
        else:
            images = torch.from_numpy(idx_source.read_idx(paths[0], ndim=3).copy()).unsqueeze(1)
            labels, classes = torch.full((images.shape[0],), -1, dtype=torch.long), []
        source = str(d)
    elif kind == "folder":
        if not arg:
            raise ConfigError("--data folder:PATH needs a path")
        images, labels, classes, skipped, converted, captions = folder_source.load_folder(
            arg, cfg.size or 64, cfg.channels or None, split=cfg.split, held_out=cfg.held_out)
        source = str(Path(arg))
        notes += _converted_note(arg, converted, images)
    elif kind == "store":   # a prepared store, memory-mapped (data/store.py)
        if not arg:
            raise ConfigError("--data store:DIR needs the folder `imagegen data prepare` wrote")
        stored = open_store(arg, cfg.split, size=cfg.size, channels=cfg.channels, name=spec)
        images, labels, classes, captions = stored.images, stored.labels, stored.classes, stored.captions
        source, mapping, notes = stored.source, stored.mapping, stored.notes
    elif kind == "zip":     # an EDM / StyleGAN2-ADA dataset.zip (data/edmzip.py)
        if not arg:
            raise ConfigError("--data zip:PATH needs a dataset.zip")
        files = scan_zip(arg, cfg.size, cfg.channels or None).split(cfg.split, cfg.held_out, spec)
        images, labels, captions, skipped, converted = files.load(arg)
        classes, source = files.classes, str(Path(arg))
        notes += _converted_note(arg, converted, images)
    elif kind == "emoji":   # 64 px colour icons with captions, the category as the class (data/emoji.py)
        images, labels, classes, skipped, captions, source = load_emoji(arg, cfg.split, cfg.channels or None)
    elif kind == "shapes":
        images, labels = shapes_source.make_shapes(cfg.split, first=cfg.limit or None)
        classes, source = list(shapes_source.CLASSES), "built-in procedural shapes"
    elif kind == "scenes":   # drawn at the asked side (not resized), captioned, no classes
        scenes = scenes_source.make_scenes(cfg.split, size=cfg.size or 32, first=cfg.limit or None)
        images, captions, classes = scenes.images, scenes.captions, []
        layout, order, grid, layout_classes = scenes.cells, scenes.order, scenes_source.GRID, scenes_source.CELL_CLASSES
        labels, source = torch.full((images.shape[0],), -1, dtype=torch.long), "built-in captioned scenes"
    else:
        raise ConfigError(
            f"--data {spec!r}: unknown source (use one of {', '.join([*IDX_DATASETS, *CIFAR_DATASETS])}, idx:DIR, folder:PATH, zip:PATH, store:DIR, shapes, scenes, "
            f"emoji[:DIR], pair:DIR, pair:SOURCE:CLASS_A,CLASS_B)"
        )
    _refuse_if_strict(spec, skipped, cfg.strict)
    if cfg.limit:
        images, labels, captions = images[: cfg.limit], labels[: cfg.limit], captions[: cfg.limit]
        layout, order = (None, None) if layout is None else (layout[: cfg.limit], order[: cfg.limit])
    if cfg.size:
        images = _resize(images, cfg.size)
    images = _set_channels(images, cfg.channels)
    return ImageDataset(images=images.contiguous(), labels=labels, classes=classes, name=spec, source=source,
                        skipped=skipped, notes=notes, captions=captions, mapping=mapping, layout=layout,
                        layout_order=order, layout_grid=grid, layout_classes=layout_classes)


def _converted_note(where: str, converted: list[str], images: torch.Tensor) -> list[str]:
    """The note a folder or zip gets when some of its images had another channel count."""
    if not converted:
        return []
    return [f"{where}: {len(converted)} image(s) with another channel count converted to {images.shape[1]} "
            f"channel(s), e.g. {converted[0]}"]


def _load_pair(cfg: DataConfig, arg: str) -> PairedDataset:
    """`pair:DIR` or `pair:SOURCE:CLASS_A,CLASS_B` (see data/paired.py)."""
    spec = cfg.source
    if not arg:
        raise ConfigError("--data pair: needs a folder (pair:DIR) or a source and two classes (pair:fashion-mnist:sneaker,ankle-boot)")
    parts = paired.split_spec(arg, set(IDX_DATASETS) | {"shapes", "idx", "folder"})
    if parts:
        base = load_data(replace(cfg, source=parts[0], limit=0))
        ds = paired.from_classes(spec, base, parts[1], cfg.limit)
    else:
        ds = paired.from_folders(spec, arg, cfg.split, cfg.size or 64, cfg.channels, cfg.limit)
        _refuse_if_strict(spec, ds.skipped, cfg.strict)
    return ds


def _refuse_if_strict(spec: str, skipped: list[tuple[str, str]], strict: bool) -> None:
    """Under --strict, any bad file is an error that names the first ten."""
    if skipped and strict:
        details = "; ".join(f"{f}: {r}" for f, r in skipped[:10])
        raise DataError(f"{spec}: {len(skipped)} bad file(s) under --strict: {details}")


def describe(ds: ImageDataset | PairedDataset) -> str:
    """The text `imagegen data info` prints."""
    if isinstance(ds, PairedDataset):
        head = [f"data:     {ds.name}", f"source:   {ds.source}", "domains:  2 (unpaired)"]
        body = [f"  {tag} {name:<16} {len(d)} x {d.channels} x {d.size} x {d.size}"
                for tag, name, d in (("A", ds.domains[0], ds.a), ("B", ds.domains[1], ds.b))]
        tail = [f"note:     {n}" for n in ds.notes]
        if ds.skipped:
            tail += [f"skipped:  {len(ds.skipped)} bad file(s)"] + [f"  {f}: {r}" for f, r in ds.skipped]
        return "\n".join(head + body + tail)
    lines = [
        f"data:     {ds.name}",
        f"source:   {ds.source}",
        f"images:   {len(ds)} x {ds.channels} x {ds.size} x {ds.size} (uint8 "
        f"{'memory-mapped' if ds.mapping is not None else 'in memory'}, {ds.images.numel() / 2**20:.1f} MiB)",
    ]
    if ds.labelled:
        counts = ds.class_counts()
        lines.append(f"classes:  {len(ds.classes)}")
        lines += [f"  {i:3d} {name:<16} {n}" for i, (name, n) in enumerate(zip(ds.classes, counts))]
    else:
        lines.append("classes:  none (unlabelled)")
    if ds.captioned:
        lines.append(f"captions: {len(ds.captions)} ({len(set(ds.captions))} different), e.g.")
        lines += [f"  {c!r}" for c in ds.captions[:3]]
    lines += [f"note:     {n}" for n in ds.notes]
    if ds.skipped:
        lines.append(f"skipped:  {len(ds.skipped)} bad file(s)")
        lines += [f"  {f}: {r}" for f, r in ds.skipped]
    return "\n".join(lines)
