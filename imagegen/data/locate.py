"""Where data lives: the folders a named dataset is looked for in, imagegen's cache, and `~` and
`$VARIABLES` in the paths of --data specs. The bottom of data/: every source reads it, it reads none."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import cache_path

SYSTEM_DATASETS = Path("/usr/share/datasets")   # Debian's dataset packages (dataset-fashion-mnist ...)


def search_dirs(name: str) -> list[Path]:
    """The folders a named dataset is looked for in, in order: $IMAGEGEN_DATA/<name>, imagegen's cache
    (config.cache_path: $IMAGEGEN_CACHE, default ~/.cache/imagegen; downloads go there), Debian's."""
    dirs = []
    if os.environ.get("IMAGEGEN_DATA"):
        dirs.append(Path(os.environ["IMAGEGEN_DATA"]) / name)
    dirs += [cache_path(name), SYSTEM_DATASETS / name]
    return dirs


def expand_path(text: str) -> str:
    """`~`, `~user` and `$VARIABLES` expanded, as a shell would at the start of a word ("~/photos")."""
    return os.path.expanduser(os.path.expandvars(text))


def expand_source(spec: str) -> str:
    """A --data spec with `~` and `$VARIABLES` expanded in its path: 'folder:~/photos' ->
    'folder:/home/me/photos'; 'captioned:' and 'pair:' specs are expanded inside. Names without a
    path ('fashion-mnist', 'pair:shapes:circle,square') come back as they are."""
    kind, sep, arg = spec.partition(":")
    if not sep:
        return expand_path(spec) if spec.startswith(("~", "$")) else spec
    if kind in ("captioned", "pair"):
        return f"{kind}:{expand_source(arg)}"
    return f"{kind}:{expand_path(arg)}"
