"""The `imagegen` command: argparse subcommands, each a few lines over the public API, in one module per
command group (training.py, images.py, datasets.py, evaluation.py, deploy.py), each command's flags beside
its handler; options.py holds what they share.

Every error imagegen raises on purpose (a typed ImagegenError) is printed as one line naming the file,
field or value, with exit status 2; a traceback means a bug. Every number an option takes has a
documented range (shown in --help), checked while the arguments are parsed, before anything is loaded.
"""

from __future__ import annotations

import argparse
import sys

from ..data import expand_path
from ..errors import ImagegenError
from ..version import __version__
from . import datasets, deploy, evaluation, images, training

GROUPS = (training, images, datasets, evaluation, deploy)   # each registers its commands (add_commands)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like the library's typed errors (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# `imagegen --help` lists the commands in these groups, one line each; the CLI reference follows them.
COMMAND_GROUPS = {
    "Train": ("train", "demo", "distill", "models"),
    "Make images": ("sample", "interpolate", "vary", "breed", "inpaint", "outpaint", "translate"),
    "Data": ("data",),
    "Evaluate and analyse": ("evaluate", "evaluator", "analyse", "leaderboard", "synth", "report"),
    "Deploy and serve": ("export", "serve"),
}

# The page of the docs (docs/ in the source, or the built site) that covers each command: the last line
# of its --help.
DOCS_PAGES = {
    "train": "guides/your-images.md", "demo": "quickstart.md", "distill": "guides/distillation.md",
    "models": "concepts/families.md", "sample": "guides/sampling.md", "interpolate": "guides/sampling.md",
    "vary": "guides/sampling.md", "breed": "guides/sampling.md", "inpaint": "guides/sampling.md",
    "outpaint": "guides/sampling.md", "translate": "guides/translation.md", "data": "concepts/data.md",
    "evaluate": "guides/evaluation.md", "evaluator": "guides/evaluation.md", "analyse": "guides/evaluation.md",
    "leaderboard": "guides/evaluation.md", "synth": "guides/evaluation.md", "report": "concepts/run-folders.md",
    "export": "guides/deploy-onnx.md", "serve": "guides/studio.md",
}


def _grouped_commands(sub) -> str:
    """The command list of `imagegen --help`: a heading per group, one line per command."""
    helps = {a.dest: a.help for a in sub._choices_actions}
    lines = []
    for group, names in COMMAND_GROUPS.items():
        lines.append(f"{group}:")
        lines += [f"  {name:13s}{helps[name]}" for name in names]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="imagegen", usage="imagegen COMMAND [options]  (imagegen COMMAND --help for one)",
                    description="Train, sample, evaluate and serve image-generative models.",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"imagegen {__version__}")
    # The list of commands is the epilog's, in groups (below); prog keeps each command's usage line short.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS,
                                prog="imagegen")
    for group in GROUPS:
        group.add_commands(sub)
    parser.epilog = (_grouped_commands(sub) + "\n\nDocs: the docs/ folder of the source, or the site it builds "
                     "(make docs-serve); start with docs/quickstart.md.")
    for name, p in sub.choices.items():
        for q in [p, *(c for a in p._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values())]:
            q.epilog = f"Docs: docs/{DOCS_PAGES[name]}"
    return parser


# Arguments that name files or folders: `~` and `$VARIABLES` in them are expanded (as the shell would not
# in `--out=~/x` or a quoted path). `--data` specs are expanded by the data layer (data.expand_source).
PATH_ARGS = ("run_dir", "runs_dir", "out", "grid", "config", "resume", "input", "image", "mask", "images",
             "image_files", "prompts", "html", "couplings_from", "paths")


def expand_paths(args: argparse.Namespace) -> argparse.Namespace:
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and name in ("images", "image_files"):   # a comma list: a.png,b.png
            setattr(args, name, ",".join(expand_path(v) for v in value.split(",")))
        elif isinstance(value, str):
            setattr(args, name, expand_path(value))
        elif isinstance(value, list):
            setattr(args, name, [expand_path(v) for v in value])
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = expand_paths(build_parser().parse_args(argv))
    except SystemExit as e:    # a bad argument (already reported on one line), --help or --version
        return int(e.code or 0)
    try:
        return args.handler(args)
    except ImagegenError as e:
        print(f"imagegen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imagegen: interrupted", file=sys.stderr)
        return 130
