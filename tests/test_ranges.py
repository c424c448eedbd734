"""Every number the CLI or a config file takes has a documented range, checked before anything is built:
out of range is exit status 2 and one line naming the option or key, the value and the range, never a
traceback. The sweeps below go over every numeric option of every subcommand and every ranged field of
every config dataclass, so an option added later without a range fails here."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest
import torch

import imagegen
from imagegen.cli import build_parser, main
from imagegen.config import Range, field_ranges
from imagegen.data import DataConfig
from imagegen.evaluate.evaluator import EvaluatorConfig
from imagegen.evaluate.geneval import JudgeConfig
from imagegen.models import REGISTRY
from imagegen.train import TrainConfig

HUGE_IMAGE = "100000"                       # a 100000-pixel image side (an allocator error before ranges)
VALUES = ["0", "-1", str(2**64), HUGE_IMAGE]
CONFIG_PAGE = Path(__file__).parents[1] / "docs" / "reference" / "config.md"   # generated from the code


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) for every leaf subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from subcommands(child, path + (name,))


def numeric_options(parser: argparse.ArgumentParser) -> list[tuple[str, Range]]:
    return [(a.option_strings[0], a.type.range) for a in parser._actions
            if a.option_strings and hasattr(a.type, "range")]


def test_every_numeric_cli_option_has_a_documented_range():
    untyped = [(" ".join(path), a.option_strings) for path, p in subcommands(build_parser()) for a in p._actions
               if a.type in (int, float)]
    assert untyped == []
    for path, p in subcommands(build_parser()):
        for flag, rng in numeric_options(p):
            action = next(a for a in p._actions if flag in a.option_strings)
            assert f"range {rng}" in action.help, (path, flag)


def test_every_numeric_config_field_has_a_range():
    classes = [TrainConfig, DataConfig, EvaluatorConfig, JudgeConfig] + [cls.Config for cls in REGISTRY.values()]
    for cls in classes:
        hints = typing.get_type_hints(cls)
        numeric = {f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float)}
        unranged = numeric - set(field_ranges(cls))
        assert unranged == set(), cls
        for name, rng in field_ranges(cls).items():
            assert getattr(cls(), name) in rng, (cls, name)         # the default lies in its own range


def test_the_config_page_documents_every_config_range():
    text = CONFIG_PAGE.read_text()
    sections = {"train": TrainConfig, "data": DataConfig}
    sections.update({f"model ({name})": cls.Config for name, cls in REGISTRY.items()})
    for section, cls in sections.items():
        body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
        for name, rng in field_ranges(cls).items():
            key = f"{section.split()[0]}.{name}"
            row = next((line for line in body.splitlines() if line.startswith(f"| `{key}` |")), "")
            assert f"| {rng} |" in row, f"docs/reference/config.md lacks the range of {key} ({rng}) under {section}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An input PNG and mask for inpaint / outpaint / translate, and an empty runs folder for serve."""
    from PIL import Image
    d = tmp_path_factory.mktemp("inputs")
    Image.new("L", (28, 28), 128).save(d / "in.png")
    Image.new("L", (28, 28), 255).save(d / "mask.png")
    (d / "runs").mkdir()
    return d


def base_args(path: tuple[str, ...], run: Path, files: Path, out: Path) -> list[str] | None:
    """Arguments that make each subcommand runnable, so in-range values run for real (or fail with a
    typed error); None for commands that would run for minutes on an in-range value (only parsed)."""
    run, img, mask = str(run), str(files / "in.png"), str(files / "mask.png")
    return {
        ("train",): ["--data", "shapes", "--model", "dcgan", "--dry-run"],
        ("sample",): [run, "--out", str(out / "s"), "--seeds", "0"],
        ("interpolate",): [run, "--seeds", "0,1", "--out", str(out / "strip.png")],
        ("vary",): [run, "--seed", "0", "--seeds", "0", "--out", str(out / "v")],
        ("breed",): [run, "--parents", "0,1", "--seeds", "0", "--out", str(out / "b")],
        ("inpaint",): [run, "--image", img, "--mask", mask, "--out", str(out / "i.png")],
        ("outpaint",): [run, "--image", img, "--out", str(out / "o.png")],
        ("translate",): [run, "--input", img, "--out", str(out / "t")],
        ("evaluate",): ["/nonexistent-run"],
        ("analyse",): ["/nonexistent-run", "--out", str(out / "a")],
        ("synth",): ["/nonexistent-run", "--out", str(out / "y")],
        ("evaluator", "train"): ["--data", "nowhere"],
        ("serve",): [str(files / "runs")],
        ("distill",): ["/nonexistent-run", "--out", str(out / "d")],
        ("data", "prepare"): ["folder:/nonexistent-folder", "--out", str(out / "p")],
        ("data", "info"): ["shapes"],
    }.get(path)


def sweep_cases():
    for path, p in subcommands(build_parser()):
        for flag, rng in numeric_options(p):
            for value in VALUES:
                yield pytest.param(path, flag, rng, value, id=f"{' '.join(path)} {flag} {value}")


def one_line(err: str) -> str:
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    return err


@pytest.mark.parametrize("path,flag,rng,value", list(sweep_cases()))
def test_cli_number_sweep(path, flag, rng, value, tiny_run, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    served = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: served.append(kw))   # serve: never listen
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)              # ... nor change ours
    number = rng.kind(value)
    if number not in rng:
        # Refused while parsing, before any file is read: one line with the option, value and range.
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*path, *(base_args(path, tiny_run, files, tmp_path) or []), flag, value])
        assert e.value.code == 2
        err = one_line(capsys.readouterr().err)
        assert flag in err and value in err and str(rng) in err
        return
    args = base_args(path, tiny_run, files, tmp_path)
    if args is None:          # in range, and running it would take minutes (demo --steps 100000)
        assert getattr(build_parser().parse_args([*path, flag, value]), flag.lstrip("-").replace("-", "_")) == number
        return
    code = main([*path, *args, flag, value])
    err = capsys.readouterr().err
    if code != 0:
        assert code == 2
        one_line(err)
    if path == ("serve",):
        assert code == 0 and len(served) == 1


def config_cases():
    for family, cls in REGISTRY.items():
        sections = [("model", cls.Config)] + ([("train", TrainConfig), ("data", DataConfig)] if family == "dcgan" else [])
        for section, config in sections:
            for name, rng in field_ranges(config).items():
                for value in VALUES:
                    yield pytest.param(family, f"{section}.{name}", rng, value, id=f"{family} {section}.{name}={value}")


@pytest.mark.parametrize("family,key,rng,value", list(config_cases()))
def test_config_number_sweep(family, key, rng, value, capsys):
    code = main(["train", "--data", "shapes", "--model", family, "--set", f"{key}={value}", "--dry-run"])
    err = capsys.readouterr().err
    if rng.kind(value) in rng:
        assert code == 0 or (code == 2 and one_line(err))      # in range; another field's check may refuse it
    else:
        assert code == 2
        assert key in one_line(err) and str(rng) in err


@pytest.mark.parametrize("args,words", [
    (["--set", "data.size=100000"], "data.size must be 0 (the source's own) or 8..1024, got 100000"),
    (["--seed", "99999999999999999999999"], "argument --seed: must be in 0..9223372036854775807, got 99999999999999999999999"),
    (["--set", "model.lr_g=nan"], "model.lr_g must be in (0, 1], got nan"),
    (["--set", "train.ema_decay=1.0"], "train.ema_decay must be in [0, 1), got 1.0"),
])
def test_the_reported_cases_stop_before_training(args, words, tmp_path, capsys):
    """Without --dry-run: the refusal comes before any data is loaded or any run folder is made."""
    code = main(["train", "--data", "shapes", "--model", "dcgan", "--out", str(tmp_path), "--no-progress", *args])
    assert code == 2 and words in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_sampling_lists_are_checked_too(tiny_run, tmp_path, capsys):
    for args, words in ((["--seeds", f"0-{2**64}"], "a seed must be in 0..9223372036854775807"),
                        (["--latent", f"0,{2**64}"], "--latent"),
                        (["--labels", str(2**64)], "--labels")):
        assert main(["sample", str(tiny_run), "--out", str(tmp_path), *args]) == 2
        assert words in one_line(capsys.readouterr().err)


def test_library_checks_share_the_cli_ranges(tiny_run):
    """The same ranges hold for library callers, who never pass through argparse."""
    from imagegen.errors import ConfigError
    from imagegen.sample import interpolate
    run = imagegen.load_run(tiny_run)
    with pytest.raises(ConfigError, match=r"--frames must be in 2\.\.1024, got 5000"):
        interpolate(run.model, 0, 1, 5000)
    with pytest.raises(ConfigError, match=r"truncation must be in \[0, 10\]"):
        run.model.sample(1, truncation=-1.0)
