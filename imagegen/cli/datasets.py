"""`imagegen data info` and `imagegen data prepare`."""

from __future__ import annotations

from ..config import field_ranges
from ..data import DataConfig, describe, load_data
from ..data.registry import HELD_OUT
from .options import add_number


def add_commands(sub) -> None:
    p = sub.add_parser("data", help="inspect a data source (info), or decode one into a store (prepare)")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("info", help="counts, shape, classes and where the files came from")
    q.add_argument("data")
    q.add_argument("--split", default="train", choices=["train", "test"])
    add_number(q, "--held-out", HELD_OUT, "a folder's or zip's share held out as its "
               "test split (data.held_out)", default=0.0)
    q.add_argument("--strict", action="store_true", help="any bad file is an error")
    q = dsub.add_parser("prepare", help="decode a source once into a memory-mapped store (then --data store:DIR)")
    q.add_argument("data", help="any --data source but pair: (folder:PATH, zip:PATH, fashion-mnist, cifar10...)")
    q.add_argument("--out", required=True, help="the store's folder (must not exist)")
    add_number(q, "--size", field_ranges(DataConfig)["size"], "image side in pixels (default: the source's own; 64 for folders)")
    q.add_argument("--channels", choices=["1", "3"], help="1 or 3 (default: the source's own)")
    add_number(q, "--held-out", HELD_OUT, "a folder's or zip's share written as the store's test "
               "split, the files that data.held_out holds out", default=0.0)
    q.add_argument("--strict", action="store_true", help="any bad file is an error")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_data)


def cmd_data(a) -> int:
    if a.data_command == "prepare":
        from ..data.prepare import prepare
        prepare(a.data, a.out, size=a.size or 0, channels=int(a.channels or 0), held_out=a.held_out,
                strict=a.strict, progress=not a.no_progress)
        return 0
    ds = load_data(DataConfig(source=a.data, split=a.split, strict=a.strict, held_out=a.held_out))
    print(describe(ds))
    return 0
