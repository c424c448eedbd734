"""The README and the docs site say what the code does: the generated reference pages match the code,
every `imagegen` command line in them parses with the real parser, the README's quick start and "your
own images" commands run end to end on tiny data, and the pages hold no history (issue numbers, dated
notes), which lives in CHANGELOG.md."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_main, write_idx_set
from imagegen import reference
from imagegen.cli import COMMAND_GROUPS, DOCS_PAGES, build_parser, main
from imagegen.models import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
WRITTEN = [p for p in PAGES if "reference" not in p.parts or p.name == "python-api.md"]   # not generated


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def command_lines(body: str) -> list[str]:
    """The shell lines of a code block, continuation lines (ending in a backslash) joined."""
    return [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def imagegen_args(line: str) -> list[str] | None:
    """The arguments of an `imagegen ...` or `... -m imagegen ...` command line; None for any other."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    if words[:1] == ["imagegen"]:
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1: words.index("-m") + 2] == ["imagegen"]:
        return words[words.index("-m") + 2:]
    return None


COMMAND_WORDS = {name for names in COMMAND_GROUPS.values() for name in names} | {"info", "prepare"}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, line, args) for every imagegen command in a code block of the README and the docs, and
    every inline `imagegen ...` span that gives more than the command's name."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for lang, body in fenced_blocks(text):
            if lang in ("", "sh", "bash", "console", "shell"):
                for line in command_lines(body):
                    args = imagegen_args(line)
                    if args is not None:
                        found.append((page.relative_to(ROOT).as_posix(), line, args))
        for span in re.findall(r"`(imagegen [^`]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)):
            args = imagegen_args(span)
            if args is None or "..." in span or "COMMAND" in span:
                continue
            if not set(args) <= COMMAND_WORDS:      # more than a command's name (`imagegen data info`)
                found.append((page.relative_to(ROOT).as_posix(), span, args))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_many_commands():
    assert len(COMMANDS) > 80
    assert {args[0] for _, _, args in COMMANDS} >= {c for group in COMMAND_GROUPS.values() for c in group} - {"demo", "models"}


@pytest.mark.parametrize("page,line,args", COMMANDS, ids=[f"{p}:{line[:60]}" for p, line, _ in COMMANDS])
def test_every_documented_command_parses(page, line, args, capsys):
    try:
        build_parser().parse_args(args)
    except SystemExit as e:         # --help and --version exit 0
        if e.code != 0:
                pytest.fail(f"{page}: `{line}` does not parse (exit {e.code}): {capsys.readouterr().err.strip()}")


def test_a_command_that_does_not_parse_is_caught():
    """The parse test above fails for a line that lacks a required option (sample without --out)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(imagegen_args("imagegen sample RUN --seeds 0-3"))


@pytest.mark.parametrize("rel", sorted(reference.PAGES))
def test_the_generated_reference_pages_match_the_code(rel):
    assert (DOCS / rel).read_text(encoding="utf-8") == reference.PAGES[rel](), \
        f"docs/{rel} is stale: run `python -m imagegen.reference`"


def test_the_reference_check_names_a_stale_page(tmp_path, capsys):
    docs = tmp_path / "docs"
    (docs / "reference").mkdir(parents=True)
    for rel, make in reference.PAGES.items():
        (docs / rel).write_text(make(), encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
    assert reference.main(["--check", "--docs", str(docs)]) == 0
    (docs / "reference/config.md").write_text("old\n", encoding="utf-8")
    assert reference.main(["--check", "--docs", str(docs)]) == 1
    assert "docs/reference/config.md" in capsys.readouterr().err
    # The README's family table is generated too: a family missing from it is stale, and rewritten.
    readme.write_text(readme.read_text(encoding="utf-8").replace("| `flow` |", "| `flowx` |"), encoding="utf-8")
    assert reference.main(["--check", "--docs", str(docs)]) == 1
    assert "README.md (families)" in capsys.readouterr().err
    assert reference.main(["--docs", str(docs)]) == 0
    assert readme.read_text(encoding="utf-8") == README.read_text(encoding="utf-8")


def test_the_readme_family_table_lists_every_family_with_its_options():
    table = reference.family_table()
    for name, cls in REGISTRY.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert all(f"`--{k}`" in row for k in cls.sample_options), row
    assert reference.with_section(README.read_text(encoding="utf-8"), "families", table) == README.read_text(encoding="utf-8")


def test_the_config_page_reads_the_source_comments():
    page = (DOCS / "reference/config.md").read_text(encoding="utf-8")
    row = next(line for line in page.splitlines() if line.startswith("| `train.time_limit` |"))
    assert "| float | `0.0` | [0, 1e+09] | seconds of training" in row
    assert "| `model.loss` | str | `\"ns\"` | 'ns', 'hinge', 'wgan-gp' |" in page


def test_the_readme_is_short_and_the_docs_hold_no_history():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250
    history = re.compile(r"\bissues? ?#?-?\d+|\b20\d\d-\d\d-\d\d\b|\b(this|that|an earlier|earlier|later|last|previous) "
                         r"session|\buntil now\b|\(was \d|\bbefore this change\b|\bthe default now\b", re.I)
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in WRITTEN
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if history.search(line)]
    assert hits == []


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert {p for p in pages if p not in nav} == set()
    assert {f"{p}" for p in DOCS_PAGES.values()} <= pages


def test_help_lists_the_command_groups_and_each_command_names_its_page(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for group, names in COMMAND_GROUPS.items():
        assert f"{group}:" in out
        assert all(re.search(rf"^  {name} +\S", out, flags=re.M) for name in names)
    assert main(["data", "prepare", "--help"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("Docs: docs/concepts/data.md")
    for name in DOCS_PAGES:
        assert main([name, "--help"]) == 0
        assert capsys.readouterr().out.rstrip().endswith(f"Docs: docs/{DOCS_PAGES[name]}")


# --- the README's own commands, run ------------------------------------------------------------------------


def readme_block(heading: str) -> list[str]:
    """The command lines of the first code block under a README heading."""
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return command_lines(fenced_blocks(section)[0][1])


# Appended to every training command: argparse keeps the last --steps, and --set applies in order.
TINY_TRAINING = ["--steps", "2", "--set", "data.limit=64", "--set", "train.sample_every=0", "--no-progress"]


@pytest.fixture
def newcomer(tmp_path, monkeypatch):
    """A fresh home (with ~/photos: 48 small colour images) and working folder, and a tiny Fashion-MNIST
    found through $IMAGEGEN_DATA."""
    home, work = tmp_path / "home", tmp_path / "work"
    photos = home / "photos"
    photos.mkdir(parents=True)
    work.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(48):
        pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(photos / f"photo{i:02d}.png")
    write_idx_set(tmp_path / "datasets" / "fashion-mnist", n=64)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("IMAGEGEN_DATA", str(tmp_path / "datasets"))
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(work)
    return home, work


def run_readme_line(line: str) -> None:
    """One README line, as a newcomer types it: `make demo` is `imagegen demo` after the install, shell
    lines (`source ...`) are the shell's, and `serve` would wait for Ctrl-C, so it is only parsed."""
    if line == "make demo":
        line = "imagegen demo"
    args = imagegen_args(line)
    if args is None:
        assert line.startswith(("source ", "make ")), line
        return
    if args[0] == "serve":
        build_parser().parse_args(args)
        return
    if args[0] in ("train", "demo"):
        args = args + (TINY_TRAINING if args[0] == "train" else ["--steps", "2", "--no-progress"])
    done = run_main(*args)
    assert done.returncode == 0, f"`{line}` failed:\n{done.stderr}"


def test_the_readme_quick_start_and_your_own_images_run_as_written(newcomer):
    home, work = newcomer
    quick, own = readme_block("Quick start"), readme_block("Train on your own images")
    assert any("folder:~/" in line for line in own)
    for line in quick + own:
        run_readme_line(line)
    demo = work / "runs" / "00000-fashion-mnist-dcgan"
    assert (demo / "report.html").is_file() and (work / "grid.png").is_file()
    assert len(list((work / "samples").glob("seed*.png"))) == 16
    mine = work / "runs" / "00001-folder-photos-dcgan"
    config = json.loads((mine / "config.json").read_text())
    assert config["data"]["source"] == f"folder:{home / 'photos'}"        # `~` expanded, recorded in full
    assert config["model"]["image_size"] == 32
    assert len(list((work / "photos-samples").glob("seed*.png"))) == 64


# --- `~` and $VARIABLES -----------------------------------------------------------------------------------


def test_data_specs_expand_home_and_variables(monkeypatch, tmp_path):
    from imagegen.data import DataConfig, expand_source
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PHOTOS", str(tmp_path / "p"))
    assert expand_source("folder:~/photos") == f"folder:{tmp_path}/photos"
    assert expand_source("store:$PHOTOS/s64") == f"store:{tmp_path}/p/s64"
    assert expand_source("captioned:folder:~/x") == f"captioned:folder:{tmp_path}/x"
    assert expand_source("pair:~/h2z") == f"pair:{tmp_path}/h2z"
    for plain in ("fashion-mnist", "pair:fashion-mnist:sneaker,ankle-boot", "shapes", "zip:/abs/d.zip"):
        assert expand_source(plain) == plain
    assert DataConfig(source="zip:~/d.zip").source == f"zip:{tmp_path}/d.zip"


def test_path_options_expand_home(monkeypatch, tmp_path):
    from imagegen.cli import expand_paths
    monkeypatch.setenv("HOME", str(tmp_path))
    args = expand_paths(build_parser().parse_args(["sample", "~/runs/r", "--out=~/s", "--grid", "$HOME/g.png"]))
    assert (args.run_dir, args.out, args.grid) == (f"{tmp_path}/runs/r", f"{tmp_path}/s", f"{tmp_path}/g.png")
    args = expand_paths(build_parser().parse_args(["interpolate", "R", "--images", "~/a.png,~/b.png", "--out", "x"]))
    assert args.images == f"{tmp_path}/a.png,{tmp_path}/b.png"


def test_data_info_reads_a_folder_under_home(newcomer):
    done = run_main("data", "info", "folder:~/photos")
    assert done.returncode == 0, done.stderr
    assert "48 x 3 x 64 x 64" in done.stdout
