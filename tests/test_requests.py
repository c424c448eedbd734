"""The typed requests (imagegen/requests.py) that the command line and the server share: checked once
against a run, refused with the field named as each front end calls it, and rendering a command that
draws the same pixels."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagegen
from imagegen.cli import build_parser
from imagegen.errors import ConfigError
from imagegen.requests import (CLI, HTTP, InpaintRequest, InterpolateRequest, SampleRequest, TrainRequest,
                               TranslateRequest, VaryRequest, shell_quote)
from imagegen.sample import generate, to_uint8
from imagegen.vary import breed

from conftest import run_main, run_maker

VARIANTS = {"cgan": ("cgan", {"width": 8, "z_dim": 16}),
            "flow": ("flow", {"width": 8, "mults": [1, 2], "sample_steps": 2})}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    return run_maker(request, tmp_path_factory, VARIANTS, steps=4)


def test_a_request_is_checked_against_its_run_and_names_fields_as_its_front_end_does(runs):
    run = imagegen.load_run(runs("flow"))
    ready = SampleRequest([3, 4, 5], labels="1", options={"steps": 3, "guidance": 2.0}).check(run)
    assert ready.labels.tolist() == [1, 1, 1] and ready.options == {"steps": 3, "guidance": 2.0}
    assert SampleRequest([0, 1]).check(run).labels.tolist() == [0, 1]          # seed mod classes
    for names, flag in ((CLI, "--eta"), (HTTP, "eta")):
        with pytest.raises(ConfigError, match=f"^{flag} does not apply to a flow model"):
            SampleRequest([0], options={"eta": 0.5}, names=names).check(run)
    with pytest.raises(ConfigError, match="steps must be in 1..1000"):
        SampleRequest([0], options={"steps": 0}).check(run)
    with pytest.raises(ConfigError, match="not trained on captions: it takes no negative_prompt"):
        SampleRequest([0], negative_prompt="blurry", names=HTTP).check(run)
    gan = imagegen.load_run(runs("cgan"))
    with pytest.raises(ConfigError, match="give latent or directions, not both"):
        SampleRequest([0], latent=[1.0], directions=[1.0], names=HTTP).check(gan)
    with pytest.raises(ConfigError, match="--labels"):
        SampleRequest([0, 1], labels="0,1,2").check(gan)


def test_the_sample_command_draws_the_same_pixels(runs, tmp_path):
    run = imagegen.load_run(runs("cgan"))
    ask = SampleRequest([7, 8, 9], labels="2", latent=[0.5, -1.25], options={"truncation": 1.5})
    ready = ask.check(run)
    want = to_uint8(generate(run.model, ready.seeds, labels=ready.labels, latent=ready.latent, **ready.options))
    command = shlex.split(ask.command(run.path, out=str(tmp_path / "s")))
    assert command[:2] == ["imagegen", "sample"] and "--truncation" in command
    assert run_main(*command[1:]).returncode == 0
    got = np.stack([np.asarray(Image.open(tmp_path / "s" / f"seed{s:06d}.png")) for s in (7, 8, 9)])
    assert np.array_equal(got.reshape(want.shape), want)


def test_the_vary_and_breed_commands_draw_the_same_pixels(runs, tmp_path):
    run = imagegen.load_run(runs("flow"))
    for sources, name in (([4], "vary"), ([4, 11], "breed")):
        ask = VaryRequest([1, 2], sources=sources, strength=0.6, mix=0.25, options={"steps": 2})
        ready = ask.check(run)
        want = to_uint8(breed(run.model, sources, ready.seeds, strength=0.6, mix=ask.mix, labels=ready.labels,
                              **ready.options))
        out = tmp_path / name
        command = shlex.split(ask.command(run.path, out=str(out)))
        assert command[1] == name and run_main(*command[1:]).returncode == 0
        got = np.stack([np.asarray(Image.open(out / f"seed{s:06d}.png")) for s in (1, 2)])
        assert np.array_equal(got.reshape(want.shape), want)
    sketch = VaryRequest([0], image="sketch.png", strength=0.5).command(Path("RUN"))
    assert sketch.startswith("imagegen vary RUN --image sketch.png --strength 0.5 --seeds 0")
    with pytest.raises(ConfigError, match="vary takes one source seed and breed two, got 3"):
        VaryRequest([0], sources=[1, 2, 3]).check(run)


def test_inpaint_interpolate_and_translate_requests_refuse_what_their_run_cannot_do(runs):
    flow, gan = imagegen.load_run(runs("flow")), imagegen.load_run(runs("cgan"))
    ready = InpaintRequest([5], labels="2", options={"steps": 2}, mask="m.png", resample=3).check(flow)
    assert ready.labels.tolist() == [2] and ready.options == {"steps": 2, "resample": 3}
    with pytest.raises(ConfigError, match="a cgan model cannot inpaint or outpaint"):
        InpaintRequest([0], mask="m.png").check(gan)
    for names, flag in ((CLI, "--solver"), (HTTP, "solver")):
        with pytest.raises(ConfigError, match=f"inpainting takes no {flag}"):
            InpaintRequest([0], mask="m.png", options={"solver": "heun"}, names=names).check(flow)
        with pytest.raises(ConfigError, match=f"{flag[:-6]}resample must be in 1..100"):
            InpaintRequest([0], mask="m.png", resample=0, names=names).check(flow)
    with pytest.raises(ConfigError, match="--sides: a comma list of left, right, top, bottom, got 'up'"):
        InpaintRequest([0], sides=["up"]).check(flow)
    with pytest.raises(ConfigError, match="--pad must be in"):
        InpaintRequest([0], pad=0).check(flow)
    with pytest.raises(ConfigError, match="inpainting draws from one seed, got 2"):
        InpaintRequest([0, 1], mask="m.png").check(flow)
    assert InpaintRequest([4], pad=6, sides=["left", "top"], options={"guidance": 1.5}).command("RUN", out="o.png") == (
        "imagegen outpaint RUN --image image.png --pad 6 --sides left,top --seed 4 --guidance 1.5 --out o.png")
    # A server that runs onnxruntime names it in every command: the engine decides a pixel's last bits.
    for ask in (SampleRequest([1]), VaryRequest([1], sources=[2]), InterpolateRequest([1, 2]), TranslateRequest("a.png"),
                InpaintRequest([1], mask="m.png")):
        words = shlex.split(ask.command("RUN", "onnxruntime"))
        assert build_parser().parse_args(words[1:]).engine == "onnxruntime", words   # and the command takes it
        assert "--engine" not in ask.command("RUN", "torch")

    assert InterpolateRequest([3, 9], frames=5, labels="1").check(gan).labels.tolist() == [1]
    with pytest.raises(ConfigError, match="exactly two seeds like 3,9, got 3"):
        InterpolateRequest([1, 2, 3]).check(gan)
    with pytest.raises(ConfigError, match="^frames must be in 2..1024"):
        InterpolateRequest([1, 2], frames=1, names=HTTP).check(gan)
    with pytest.raises(ConfigError, match="exactly two image files"):
        InterpolateRequest([1, 2], images=["a.png", "b.png"]).check(gan)
    with pytest.raises(ConfigError, match="is a flow model, which draws images from seeds"):
        TranslateRequest("photos/").check(flow)


def test_a_train_request_resolves_its_config_before_anything_trains_and_its_command_gives_the_same(tmp_path):
    ask = TrainRequest(model="flow", data="shapes", flags={"steps": 7, "batch_size": 8, "seed": None},
                       sets=["model.width=8", "train.time_limit=30"], strict=True)
    cfg = ask.check()
    assert (cfg.family, cfg.data.source, cfg.train.steps, cfg.train.batch_size, cfg.model.width,
            cfg.train.time_limit, cfg.data.strict) == ("flow", "shapes", 7, 8, 8, 30.0, True)
    words = ask.command(out=tmp_path)
    assert words[:2] == ["imagegen", "train"] and "--seed" not in words
    shown = run_main(*words[1:], "--dry-run")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout[:shown.stdout.rindex("}") + 1]) == cfg.to_json()
    with pytest.raises(ConfigError, match="widht"):
        TrainRequest(model="flow", sets=["model.widht=8"]).check()
    with pytest.raises(ConfigError, match="train has no flag epochs"):
        TrainRequest(model="flow", flags={"epochs": 3}).check()
    with pytest.raises(ConfigError, match="nope"):
        TrainRequest(model="nope").check()


def test_prompts_are_quoted_for_the_shell():
    for text in ("plain", "a red circle", "it's 'quoted'", "semi;colon $HOME `x`"):
        assert shlex.split(f"echo {shell_quote(text)}")[1:] == [text]
    ask = SampleRequest([0], prompt="a red circle", negative_prompt="blue")
    assert shlex.split(ask.command("RUN"))[5:9] == ["--prompt", "a red circle", "--negative-prompt", "blue"]


def test_the_server_renders_no_command_of_its_own():
    """The reproduce commands come from the request layer: serve/ writes no command line's flags."""
    serve = Path(imagegen.__file__).parent / "serve"
    for path in serve.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert '"--seeds"' not in text and '"--labels"' not in text and '"--strength"' not in text, path
