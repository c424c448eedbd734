"""EmojiOne's 1,794 colour emoji from Debian's `ruby-gemojione`: `--data emoji` (or `emoji:DIR`).

A real captioned colour dataset that ships offline: the gem folder holds `config/index.json` (one entry a
shortname: its code points, name, keywords and category) and `assets/png/<CODE POINTS>.png` (64 x 64, RGBA
or palette with transparency). imagegen reads it as:
- images: each PNG with its transparency composited on white (data/folder.decode_image), RGB 64 x 64;
- captions: the name, then up to MAX_KEYWORDS of its keywords that the name does not already say
  ("grinning face, happy, smile");
- labels: the category (people, nature, food, ...), the classes sorted by name;
- split: a fixed share of the shortnames, chosen by a hash of the shortname alone, is the test split:
  the same images whatever the order of the index, whichever machine, and stable if entries are added.

Bad entries (not an object, a field of the wrong type) and bad or missing files are reported in
`skipped` (or refused under --strict), never a traceback.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from .folder import decode_files

# Where Debian's package puts the gem (the version is part of the folder's name).
SYSTEM_GLOB = "/usr/share/rubygems-integration/all/gems/gemojione-*"
INDEX = Path("config/index.json")
PNGS = Path("assets/png")
SIZE = 64
TEST_SHARE = 10          # one shortname in TEST_SHARE is held out (about 180 of 1,794)
MAX_KEYWORDS = 6
MAX_INDEX_BYTES = 64 << 20
CODE_POINTS = re.compile(r"^[0-9A-Fa-f]{1,6}(-[0-9A-Fa-f]{1,6})*$")


@dataclass
class Emoji:
    key: str          # the shortname without colons: "grinning"
    file: Path
    caption: str
    category: str


def find_root(arg: str = "") -> Path:
    """The gem folder: `arg` when given, else the newest gemojione Debian installed."""
    if arg:
        root = Path(arg)
        if not (root / INDEX).is_file():
            raise DataError(f"--data emoji:{arg}: no {INDEX} there (give the gemojione folder that holds config/ "
                            f"and assets/png/)")
        return root
    found = sorted(glob.glob(SYSTEM_GLOB), key=_version)
    for root in reversed(found):
        if (Path(root) / INDEX).is_file():
            return Path(root)
    raise DataError("--data emoji: Debian's ruby-gemojione is not installed (no "
                    f"{SYSTEM_GLOB}/{INDEX}); install it with `sudo apt-get install ruby-gemojione` "
                    "(`make` does, as root), or give its folder: --data emoji:DIR")


def _version(path: str) -> tuple:
    tail = path.rsplit("-", 1)[-1]
    return tuple(int(p) if p.isdigit() else 0 for p in tail.split("."))


def in_test_split(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % TEST_SHARE == 0


def caption(name: str, keywords: list[str]) -> str:
    """The name and up to MAX_KEYWORDS keywords not already in it, in their order."""
    said = set(name.lower().split())
    extra: list[str] = []
    for k in keywords:
        k = " ".join(k.lower().replace("-", " ").replace("_", " ").split())
        if k and k not in extra and not set(k.split()) <= said and len(k) > 1:
            extra.append(k)
    return ", ".join([name.lower(), *extra[:MAX_KEYWORDS]])


def read_index(root: Path) -> tuple[list[Emoji], list[tuple[str, str]]]:
    """(every well-formed entry, sorted by shortname; (entry, reason) of the others)."""
    path = root / INDEX
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise DataError(f"{path}: over {MAX_INDEX_BYTES >> 20} MiB; not an emoji index")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path}: not a JSON index: {e}") from None
    if not isinstance(index, dict):
        raise DataError(f"{path}: expected an object of shortnames, got a {type(index).__name__}")
    good, bad = [], []
    for key in sorted(index):
        entry, where = index[key], f"{path}: {key!r}"
        if not isinstance(entry, dict):
            bad.append((where, "not an object"))
            continue
        code, name, category = entry.get("unicode"), entry.get("name"), entry.get("category")
        keywords = entry.get("keywords", [])
        if not isinstance(code, str) or not CODE_POINTS.match(code):
            bad.append((where, f"'unicode' must be code points like 1F600, got {code!r}"[:200]))
        elif not isinstance(name, str) or not name.strip():
            bad.append((where, "'name' must be a non-empty string"))
        elif not isinstance(category, str) or not category.strip():
            bad.append((where, "'category' must be a non-empty string"))
        elif not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            bad.append((where, "'keywords' must be a list of strings"))
        else:
            good.append(Emoji(key, root / PNGS / f"{code.upper()}.png", caption(name.strip(), keywords),
                              category.strip()))
    return good, bad


def load_emoji(arg: str, split: str, channels: int | None
               ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[tuple[str, str]], list[str], str]:
    """(uint8 N x C x 64 x 64, labels N, classes, skipped, captions, where) of one split."""
    root = find_root(arg)
    entries, skipped = read_index(root)
    classes = sorted({e.category for e in entries})      # from both splits: the same classes in each
    entries = [e for e in entries if in_test_split(e.key) == (split == "test")]
    missing = [e for e in entries if not e.file.is_file()]
    skipped += [(str(e.file), "no such file (named by config/index.json)") for e in missing]
    entries = [e for e in entries if e.file.is_file()]
    images, kept, bad = decode_files([e.file for e in entries], SIZE, channels or 3)
    skipped += bad
    if images is None:
        raise DataError(f"{root}: no readable emoji image in the {split} split"
                        + (f" ({len(skipped)} skipped, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    entries = [entries[i] for i in kept]
    labels = torch.tensor([classes.index(e.category) for e in entries], dtype=torch.long)
    return images, labels, classes, skipped, [e.caption for e in entries], str(root)
