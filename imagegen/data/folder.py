"""Folders of images: PNG, JPEG and WebP only, labels from class subfolders when present, captions when
the folder has them (for text-to-image): a `metadata.jsonl` or `metadata.csv` at its top, in the Hugging
Face `imagefolder` convention (a `file_name` relative to the folder, and `text` or `caption`), or a
sidecar file beside an image with its stem and `.txt` or `.caption`. Once any image has a caption, an
image without one is reported and skipped like a bad file.

Every file is opened defensively. A corrupt, truncated, empty, wrongly named or oversized
(decompression-bomb) file is reported with its reason and skipped; the caller decides whether that is
fatal (`--strict`). A symlink whose target lies outside the folder is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError, ImageFileError, ImageTooLargeError

ALLOWED_FORMATS = {"PNG": {".png"}, "JPEG": {".jpg", ".jpeg"}, "WEBP": {".webp"}}
ALLOWED_SUFFIXES = set().union(*ALLOWED_FORMATS.values())
MAX_FILE_BYTES = 32 << 20     # a single training image over 32 MiB is refused unread
MAX_PIXELS = 40_000_000       # ... as is one that claims over 40 Mpx (decompression bombs)
CAPTION_SUFFIXES = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MAX_CAPTION_CHARS = 1000


def list_images(root: Path, *, classes: bool = True) -> tuple[list[tuple[Path, str | None]], list[tuple[str, str]], list[str]]:
    """Walk `root`: ([(file, class name or None)], [(file, reason) skipped while listing], classes).

    Classes are the immediate subfolders that contain images; files directly in `root` are unlabelled
    unless there are no class folders at all. With classes=False subfolders are just folders: every
    image is listed, unlabelled.
    """
    root = root.resolve()
    files: list[tuple[Path, str | None]] = []
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        for d in list(dirnames):
            p = here / d
            if p.is_symlink():
                skipped.append((str(p), "symlinked folder refused"))
                dirnames.remove(d)
        # a .txt or .caption file is a caption when an image with its stem lies beside it
        stems = {Path(f).stem: True for f in filenames if Path(f).suffix.lower() in ALLOWED_SUFFIXES}
        for name in sorted(filenames):
            p = here / name
            rel = p.relative_to(root)
            if p.is_symlink():
                target = p.resolve()
                if not target.is_relative_to(root):
                    skipped.append((str(p), f"symlink escapes the folder (points to {target})"))
                    continue
            if (here == root and name in METADATA_FILES) or (p.suffix.lower() in CAPTION_SUFFIXES and stems.get(p.stem)):
                continue                                   # captions (folder_captions), not images
            if p.suffix.lower() not in ALLOWED_SUFFIXES:
                skipped.append((str(p), f"extension {p.suffix or '(none)'!r} is not one of {sorted(ALLOWED_SUFFIXES)}"))
                continue
            label = rel.parts[0] if len(rel.parts) > 1 and classes else None
            files.append((p, label))
    names = sorted({c for _, c in files if c is not None})
    if names and any(c is None for _, c in files):
        # Loose files beside class folders have no class: report them rather than guess.
        skipped += [(str(p), "not inside a class folder") for p, c in files if c is None]
        files = [(p, c) for p, c in files if c is not None]
    return files, skipped, names


GRAY_MODES = ("L", "1", "I;16", "I", "LA")


def load_image(path: Path, size: int | None, channels: int, converted: list[str] | None = None) -> np.ndarray:
    """Decode one image to uint8 H x W x C (resized to `size` and centre-cropped, unless size is None),
    or raise ImageFileError. When the file has another channel count than `channels`, it is converted
    and its path appended to `converted` (if given), so the caller can say so."""
    path = Path(path)
    try:
        nbytes = path.stat().st_size
    except OSError as e:
        raise ImageFileError(f"{path}: cannot stat: {e}") from None
    if nbytes == 0:
        raise ImageFileError(f"{path}: file is empty")
    if nbytes > MAX_FILE_BYTES:
        raise ImageFileError(f"{path}: {nbytes} bytes is over the limit of {MAX_FILE_BYTES}")
    return decode_image(path, str(path), size, channels, converted, suffix=path.suffix.lower())


def decode_image(source: Path | BinaryIO, name: str, size: int | None, channels: int,
                 converted: list[str] | None = None, *, max_pixels: int = MAX_PIXELS,
                 suffix: str | None = None) -> np.ndarray:
    """Decode a PNG, JPEG or WebP (a path or a binary file object, e.g. an upload's bytes) to uint8
    H x W x C; `name` is what errors call it. The one decoder behind files, CLI inputs and the web API,
    so one image gives the same pixels everywhere: EXIF orientation applied, transparency composited on
    white, converted to `channels`, then fitted to size x size (if given). The pixel count is checked
    from the header before anything is decoded (ImageTooLargeError); `suffix`, if given, must match the
    format found inside."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=list(ALLOWED_FORMATS)) as img:
                if img.width * img.height > max_pixels:
                    raise ImageTooLargeError(f"{name}: {img.width}x{img.height} is over the limit of {max_pixels} pixels")
                if suffix is not None and suffix not in ALLOWED_FORMATS[img.format]:
                    raise ImageFileError(f"{name}: holds a {img.format} image, which does not match its extension")
                img.load()
                img = ImageOps.exif_transpose(img)
                if converted is not None and (img.mode in GRAY_MODES) != (channels == 1):
                    converted.append(name)
                if img.mode in ("RGBA", "LA", "P"):
                    img = img.convert("RGBA")
                    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(background, img)
                img = img.convert("L" if channels == 1 else "RGB")
                if size is not None:
                    img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
                arr = np.asarray(img, dtype=np.uint8)
    except ImageFileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{name}: decompression bomb refused ({e})") from None
    except UnidentifiedImageError:   # its message names the source, which for an upload is an object's repr
        raise ImageFileError(f"{name}: cannot decode image: not a PNG, JPEG or WebP image") from None
    except Exception as e:  # PIL raises many types for corrupt data: UnidentifiedImageError, OSError, SyntaxError...
        raise ImageFileError(f"{name}: cannot decode image: {e}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def guess_channels(files: list[tuple[Path, str | None]]) -> int:
    """1 when the first readable images are all grayscale, else 3."""
    seen = 0
    for p, _ in files:
        try:
            with Image.open(p, formats=list(ALLOWED_FORMATS)) as img:
                if img.mode not in GRAY_MODES:
                    return 3
                seen += 1
        except Exception:
            continue
        if seen >= 16:
            break
    return 1 if seen else 3


@dataclass
class ImageFiles:
    """Image files to decode, with what is known of them before any is decoded: a folder's files
    (scan_folder) or an EDM zip's members (data/edmzip.py). `chunks` decodes them in order, a chunk at a
    time, so a prepared store (data/store.py) never holds more than one chunk; `load` decodes them all."""
    keys: list                     # what `read` takes: file paths, or zip member names
    labels: list[int]              # one per key; -1 when unlabelled
    captions: list[str]            # one per key, or empty
    classes: list[str]
    skipped: list[tuple[str, str]]  # (file, reason) found while listing
    size: int
    channels: int
    read: Callable[..., np.ndarray] = None   # read(key, size, channels, converted) -> uint8 H x W x C
    name: Callable[[Any], str] = str         # what errors call a key
    within: Callable[[Any], str] = str       # a key's name inside its source: what the held-out hash reads

    def __len__(self) -> int:
        return len(self.keys)

    def split(self, which: str, share: float, what: str) -> "ImageFiles":
        """The files of one split when `share` of them is held out as the test split ("test": those;
        "train": the rest), each file's side chosen by a hash of its name within the folder (`within`),
        so a file keeps its side when others are added, removed or the folder moves. share 0: no split,
        every file in both. `what` names the source in the error when the split would be empty."""
        if not share:
            return self
        keep = [i for i, key in enumerate(self.keys) if held_out(self.within(key), share) == (which == "test")]
        if not keep and self.keys:
            raise DataError(f"{what}: data.held_out = {share:g} leaves none of its {len(self.keys)} images in the "
                            f"{which} split; {'raise' if which == 'test' else 'lower'} it")
        return dataclasses.replace(self, keys=[self.keys[i] for i in keep], labels=[self.labels[i] for i in keep],
                                   captions=[self.captions[i] for i in keep] if self.captions else [])

    def chunks(self, n: int = 1024) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, list[str], list[tuple[str, str]], list[str]]]:
        """Per chunk of n keys, in order: (uint8 k x C x S x S of its good images or None, their labels,
        their captions, (file, reason) of its bad ones, the files whose channel count was converted)."""
        for start in range(0, len(self.keys), n):
            keys = self.keys[start:start + n]
            converted: list[str] = []
            images, kept, bad = decode_files(keys, self.size, self.channels, converted, read=self.read, name=self.name)
            labels = torch.tensor([self.labels[start + i] for i in kept], dtype=torch.long)
            captions = [self.captions[start + i] for i in kept] if self.captions else []
            yield images, labels, captions, bad, sorted(converted)

    def load(self, what: str) -> tuple[torch.Tensor, torch.Tensor, list[str], list[tuple[str, str]], list[str]]:
        """Every good image: (uint8 N x C x S x S, labels, captions, skipped, converted); `what` names the
        source in the error when none is readable."""
        parts = list(self.chunks())
        skipped = self.skipped + [b for part in parts for b in part[3]]
        good = [part for part in parts if part[0] is not None]
        if not good:
            raise DataError(f"{what}: no readable images ({len(skipped)} skipped)")
        return (torch.cat([p[0] for p in good]), torch.cat([p[1] for p in good]),
                [c for p in good for c in p[2]], skipped, sorted(c for p in parts for c in p[4]))


def held_out(name: str, share: float) -> bool:
    """Whether the file `name` (its path within the folder, / separated) is in the held-out `share`: the
    first 8 bytes of its name's SHA-256, read as a fraction of 2^64, fall below the share."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") < share * 2**64


def scan_folder(root: str | Path, size: int, channels: int | None, *, classes: bool = True) -> ImageFiles:
    """The images under `root` with their classes and captions, listed but not decoded (see load_folder)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    files, skipped, class_names = list_images(root, classes=classes)
    captions, problems = folder_captions(root, [path for path, _ in files])
    skipped += problems
    if captions:   # captioned: an image without a caption cannot be trained on
        skipped += [(str(p), "no caption (metadata or a .txt/.caption file beside it)") for p, _ in files
                    if p not in captions]
        files = [(p, c) for p, c in files if p in captions]
    if channels is None:
        channels = guess_channels(files)
    class_index = {c: i for i, c in enumerate(class_names)}
    inside = Path(root).resolve()
    return ImageFiles(keys=[p for p, _ in files], labels=[class_index[c] if c is not None else -1 for _, c in files],
                      captions=[captions[p] for p, _ in files] if captions else [], classes=class_names,
                      skipped=skipped, size=size, channels=channels,
                      within=lambda path: path.relative_to(inside).as_posix())   # / separated, as the folder moves


def load_folder(root: str | Path, size: int, channels: int | None, *, classes: bool = True, split: str = "train",
                held_out: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[tuple[str, str]], list[str], list[str]]:
    """Load every good image under `root`: (uint8 N x C x H x W, labels, classes, skipped, converted,
    captions), where `converted` lists the files whose channel count was changed to `channels` (by
    default that of the first images: 1 when they are all grayscale, else 3), and `captions` has one
    caption per image or is empty (folder_captions). classes=False: no class subfolders. `held_out`:
    the share of the files that is the test split (ImageFiles.split), and `split` the one loaded."""
    files = scan_folder(root, size, channels, classes=classes).split(split, held_out, f"folder:{root}")
    images, labels, captions, skipped, converted = files.load(str(Path(root)))
    return images, labels, files.classes, skipped, converted, captions


def folder_captions(root: Path, paths: list[Path]) -> tuple[dict[Path, str], list[tuple[str, str]]]:
    """({image path: caption}, [(file, problem)]) from the folder's metadata file and sidecar files (module
    docstring). A metadata row for a file that is not among `paths`, a row without a caption, or a bad
    line is a reported problem; the metadata wins over a sidecar."""
    root = root.resolve()
    exact = set(paths)
    known: dict[Path, Path] = {}   # resolved path -> listed path, built only if a metadata row needs it
    captions: dict[Path, str] = {}
    problems: list[tuple[str, str]] = []

    def listed(path: Path) -> Path | None:
        if path in exact:
            return path
        if not known:
            known.update((p.resolve(), p) for p in paths)
        return known.get(path.resolve())

    def take(path: Path, text, where: str) -> None:
        if not isinstance(text, str) or not text.strip():
            problems.append((where, "empty or missing caption (text or caption)"))
        elif len(text) > MAX_CAPTION_CHARS:
            problems.append((where, f"caption of {len(text)} characters (at most {MAX_CAPTION_CHARS})"))
        elif (found := listed(path)) is None:
            problems.append((where, f"no such image in the folder: {path.relative_to(root) if path.is_relative_to(root) else path}"))
        else:
            captions.setdefault(found, " ".join(text.split()))

    for name in METADATA_FILES:
        meta = root / name
        if not meta.is_file():
            continue
        try:
            lines = meta.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            problems.append((str(meta), f"unreadable ({e})"))
            continue
        rows: list[tuple[int, dict]] = []
        if name.endswith(".jsonl"):
            for i, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append((f"{meta}:{i}", f"not JSON ({e.msg})"))
                    continue
                except RecursionError:
                    problems.append((f"{meta}:{i}", "not JSON (nested too deeply)"))
                    continue
                rows.append((i, row if isinstance(row, dict) else {}))
        else:
            reader = enumerate(csv.DictReader(lines))
            while True:   # row by row: a bad row (say a field over csv's 128 KiB limit) ends the file, reported
                try:
                    i, row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    problems.append((str(meta), f"unreadable CSV at line {len(rows) + 2} ({e}); its other rows are not read"))
                    break
                rows.append((i + 2, row))
        for i, row in rows:
            file_name = row.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                problems.append((f"{meta}:{i}", "no file_name"))
                continue
            take(root / file_name, row.get("text", row.get("caption")), f"{meta}:{i}")
    # Sidecars: looked up in one listing per folder, not two stat calls per image (400,000 images: 19 s).
    listings: dict[Path, set[str]] = {}
    for path in paths:
        if path.parent not in listings:
            listings[path.parent] = set(os.listdir(path.parent))
        for suffix in CAPTION_SUFFIXES:
            side = path.with_suffix(suffix)
            if side.name in listings[path.parent] and side.is_file() and path not in captions:
                try:
                    take(path, side.read_text(encoding="utf-8"), str(side))
                except (OSError, UnicodeDecodeError) as e:
                    problems.append((str(side), f"unreadable ({e})"))
    return captions, problems


def decode_files(paths: list, size: int, channels: int, converted: list[str] | None = None, *,
                 read: Callable[..., np.ndarray] | None = None, name: Callable[[Any], str] = str
                 ) -> tuple[torch.Tensor | None, list[int], list[tuple[str, str]]]:
    """Decode `paths` with `load_image` (or `read(key, size, channels, converted)` for other keys, such
    as zip members): (uint8 N x C x H x W of the good ones, or None when there are none; the indices into
    paths of those N; (file, reason) of each bad one, skipped)."""
    read = read or load_image

    def work(path):
        try:
            return read(path, size, channels, converted), None
        except ImageFileError as e:
            return None, (name(path), str(e).removeprefix(f"{name(path)}: "))

    # PIL releases the GIL while decoding, so threads overlap the decode of several files.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(work, paths))
    kept = [i for i, (arr, _) in enumerate(results) if arr is not None]
    bad = [why for _, why in results if why is not None]
    if not kept:
        return None, [], bad
    images = torch.from_numpy(np.stack([results[i][0] for i in kept])).permute(0, 3, 1, 2).contiguous()
    return images, kept, bad
