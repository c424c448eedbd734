"""`--data zip:PATH`: a dataset.zip as StyleGAN2-ADA's and EDM's `dataset_tool.py` write them, so datasets
people already prepared for those codebases work as they are.

Layout: image members (PNG; JPEG and WebP are read too), usually `00000/img00000000.png`, and an optional
`dataset.json` of the form {"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null}. Integer
labels become classes "0" .. "K-1" (the file names none); vector labels (conditioning vectors) are
refused with a clear error. Members are read one at a time into memory, never extracted; each is checked
for size before it is read, and decoded by the one decoder behind every image imagegen reads
(folder.decode_image). An image without a label in a labelled zip, or a label for a member that is not
there, is reported and skipped like a bad file.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..errors import DataError, ImageFileError
from .folder import ALLOWED_SUFFIXES, GRAY_MODES, MAX_FILE_BYTES, ImageFiles, decode_image

LABELS_FILE = "dataset.json"
MAX_CLASSES = 100_000             # as many as a conditional model takes (models' num_classes)
MAX_LABELS_BYTES = 256 << 20      # dataset.json itself (ImageNet's 1.28 M labels take about 50 MiB)


def scan_zip(path: str | Path, size: int, channels: int | None) -> ImageFiles:
    """The zip's images with their labels, listed but not decoded. size 0: the first image's side."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip ({e})") from None
    infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
    skipped: list[tuple[str, str]] = []
    names = []
    for n in sorted(infos):
        if n == LABELS_FILE:
            continue
        if PurePosixPath(n).suffix.lower() not in ALLOWED_SUFFIXES:
            skipped.append((f"{path}:{n}", f"extension {PurePosixPath(n).suffix or '(none)'!r} is not one of {sorted(ALLOWED_SUFFIXES)}"))
        else:
            names.append(n)
    labels, classes = [-1] * len(names), []
    if LABELS_FILE in infos:
        table = _read_labels(zf, path)
        if table is not None:
            missing = [n for n in names if n not in table]
            skipped += [(f"{path}:{n}", f"no label in {LABELS_FILE}") for n in missing]
            skipped += [(f"{path}:{LABELS_FILE}", f"a label for {n!r}, which is not an image in the zip")
                        for n in sorted(set(table) - set(names))]
            names = [n for n in names if n in table]
            labels = [table[n] for n in names]
            classes = [str(i) for i in range(max(labels, default=-1) + 1)]

    def read(name: str, size_: int, channels_: int, converted: list[str] | None) -> np.ndarray:
        where = f"{path}:{name}"
        info = infos[name]
        if info.file_size == 0:
            raise ImageFileError(f"{where}: member is empty")
        if info.file_size > MAX_FILE_BYTES:
            raise ImageFileError(f"{where}: {info.file_size} bytes is over the limit of {MAX_FILE_BYTES}")
        try:
            data = zf.read(name)   # ZipFile serialises reads of its file: threads may share it
        except (zipfile.BadZipFile, OSError, EOFError) as e:   # a bad CRC, a broken deflate stream
            raise ImageFileError(f"{where}: cannot read the member ({e})") from None
        return decode_image(io.BytesIO(data), where, size_, channels_, converted,
                            suffix=PurePosixPath(name).suffix.lower())

    if channels is None or not size:
        side, gray = _first_image(zf, names)
        size = size or side
        channels = channels or (1 if gray else 3)
    return ImageFiles(keys=names, labels=labels, captions=[], classes=classes, skipped=skipped, size=size,
                      channels=channels, read=read, name=lambda n: f"{path}:{n}")


def _first_image(zf: zipfile.ZipFile, names: list[str]) -> tuple[int, bool]:
    """(side, grayscale?) of the first readable image, from its header: dataset_tool writes every image
    at one size; grayscale by its mode, as a folder's channels are guessed (folder.guess_channels)."""
    for n in names[:16]:
        try:
            with Image.open(io.BytesIO(zf.read(n))) as img:
                return min(img.size), img.mode in GRAY_MODES
        except Exception:
            continue
    return 64, False


def _read_labels(zf: zipfile.ZipFile, path: Path) -> dict[str, int] | None:
    """{member: class} from dataset.json, or None when it says "labels": null."""
    where = f"{path}:{LABELS_FILE}"
    if zf.getinfo(LABELS_FILE).file_size > MAX_LABELS_BYTES:
        raise DataError(f"{where}: {zf.getinfo(LABELS_FILE).file_size} bytes, over the {MAX_LABELS_BYTES} a label table may have")
    try:
        meta = json.loads(zf.read(LABELS_FILE).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, zipfile.BadZipFile) as e:
        raise DataError(f"{where}: not readable JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{where}: not readable JSON (nested too deeply)") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DataError(f"{where}: expected an object with a \"labels\" field")
    rows = meta["labels"]
    if rows is None:
        return None
    if not isinstance(rows, list):
        raise DataError(f"{where}: \"labels\" must be a list of [file name, label] pairs or null")
    table: dict[str, int] = {}
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)):
            raise DataError(f"{where}: labels[{i}] is not a [file name, label] pair: {str(row)[:80]}")
        label = row[1]
        if isinstance(label, list):
            raise DataError(f"{where}: labels[{i}] is a vector; imagegen takes class labels (integers) only")
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise DataError(f"{where}: labels[{i}] = {str(label)[:40]} is not a class index (an integer >= 0)")
        if label >= MAX_CLASSES:   # classes are 0 .. the largest label: 10**12 would be 10**12 names
            raise DataError(f"{where}: labels[{i}] = {label}; class indices go up to {MAX_CLASSES - 1}")
        table[row[0]] = label
    return table
