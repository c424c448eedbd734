"""Text-to-image: the frozen encoder, the caption cache, text in both backbones, and prompts through the
library, the CLI and the API (issue 16)."""

from __future__ import annotations

import pytest
import torch

import imagegen
from imagegen import text as T
from imagegen.cli import main as cli_main
from imagegen.errors import ConfigError
from imagegen.nets.dit import DiT
from imagegen.nets.unet import UNet

# caption embeddings go to a cache of this module's own (conftest.private_cache)
pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """family -> a tiny text run trained on 64 captioned scenes (made when first asked for)."""
    made = {}

    def get(family: str, backbone: str = "unet"):
        if (family, backbone) not in made:
            model = {"width": 8, "mults": [1, 2], "backbone": backbone, "dit_size": "xxs", "patch": 4}
            cfg = imagegen.resolve_config({"family": family, "model": model, "data": {"source": "scenes", "limit": 64},
                                           "train": {"steps": 6, "batch_size": 8, "sample_every": 0, "log_every": 3,
                                                     "grid_size": 4, "checkpoint_every": 6}})
            made[family, backbone] = imagegen.train(cfg, out=tmp_path_factory.mktemp(family), progress=False)
        return made[family, backbone]
    return get


def test_a_text_encodes_to_the_same_numbers_alone_or_with_others():
    both = T.encode(["a red circle", "a large blue star in the top left"])
    alone = T.encode(["a red circle"])
    n = int(alone.mask.sum())
    assert both.mask[0].sum() == n and both.mask[1].sum() > n
    assert torch.equal(both.tokens[0, :n], alone.tokens[0]) and torch.equal(both.pooled[0], alone.pooled[0])
    assert not both.tokens[0, n:].any()                               # padding is zeros
    assert torch.allclose(both.pooled.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(both.pooled[0], both.pooled[1], atol=1e-2)


@pytest.mark.parametrize("prompt, message", [("", "empty"), ("   ", "empty"), ("star " * 40, "tokens long"),
                                             ("x" * (T.MAX_PROMPT_CHARS + 1), "characters")])
def test_a_bad_prompt_is_a_clear_error(prompt, message):
    with pytest.raises(ConfigError, match=message):
        T.check_prompt(prompt)


def test_captions_are_encoded_once_each_and_read_back_from_the_cache(monkeypatch, tmp_path):
    captions = ["a red circle", "two squares", "a red circle", "a star"]
    table, index = T.caption_table(captions, cache=tmp_path)
    assert len(table) == 3 and index.tolist() == [0, 2, 0, 1]            # sorted: red circle, star, squares
    assert torch.equal(table[index[1]].pooled, T.encode(["two squares"]).pooled[0])
    monkeypatch.setattr(T, "encode", lambda *a, **k: pytest.fail("encoded again"))
    again, _ = T.caption_table(captions, cache=tmp_path)
    assert torch.equal(again.tokens, table.tokens)
    monkeypatch.undo()
    (cache,) = tmp_path.glob("captions-*.safetensors")
    cache.write_bytes(b"damaged")
    rebuilt, _ = T.caption_table(captions, cache=tmp_path, log=lambda *_: None)
    assert torch.equal(rebuilt.tokens, table.tokens)


def _randomised(net: torch.nn.Module) -> torch.nn.Module:
    """The network with every parameter random (zero-initialised maps would hide where the text goes)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


@pytest.mark.parametrize("make", [lambda: UNet(3, 8, (1, 2), text_dim=T.DIM),
                                  lambda: DiT(3, "xxs", patch=4, text_dim=T.DIM)], ids=["unet", "dit"])
def test_word_order_reaches_the_output_through_cross_attention(make):
    """"a circle left of a square" and "a square left of a circle" have nearly the same pooled embedding;
    with the pooled part held equal, the output still differs: the tokens are read, in order."""
    net = _randomised(make())
    words = T.encode(["a circle left of a square", "a square left of a circle"])
    x, t = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1), torch.full((2,), 500)
    pooled = words.pooled[:1].expand(2, -1)
    with torch.no_grad():
        out = net(x, t, None, pooled, words.tokens, words.mask)
        null = net(x, t, None, torch.zeros(2, T.DIM), torch.zeros(2, 3, T.DIM), torch.zeros(2, 3, dtype=torch.bool))
    assert (out[0] - out[1]).abs().max() > 1e-3
    # the null text (an empty mask): the learned null, no NaN; its two identical rows agree up to the
    # rounding of their place in the batch (not bit for bit on every CPU: seen under AVX2)
    assert torch.isfinite(null).all() and torch.allclose(null[0], null[1], atol=1e-5)
    assert (out[0] - out[1]).abs().max() > 100 * (null[0] - null[1]).abs().max()


def test_position_codes_let_the_text_reach_each_place_differently():
    """With the same features at every place, cross-attention without position codes gives every place the
    same answer; with them ("in the top left" needs it), places differ."""
    from imagegen.nets.unet import TextAttention
    words = T.encode(["a large red star in the top left"])
    x = torch.randn(1, 16, 1, 1).expand(1, 16, 4, 4)                  # one feature vector, 4 x 4 places
    for positions in (False, True):
        layer = _randomised(TextAttention(16, T.DIM, positions=positions))
        with torch.no_grad():
            out = layer(x, words.tokens, words.mask)
        spread = (out - out[:, :, :1, :1]).abs().max().item()
        assert (spread > 1e-2) if positions else (spread < 1e-5), (positions, spread)


def test_a_text_network_starts_where_a_network_without_text_does():
    torch.manual_seed(0)
    dit = DiT(3, "xxs", patch=4, text_dim=T.DIM)
    words = T.encode(["a red circle"])
    tokens = torch.randn(1, 16, dit.dim)
    c = dit.condition(torch.tensor([100]), None, words.pooled, words.mask)
    ctx = dit.text.context(words.tokens, words.mask)
    for block in dit.blocks:                                  # adaLN-Zero, and cross-attention's map at zero
        assert torch.equal(block(tokens, c, *ctx), tokens)
    unet = UNet(3, 8, (1, 2), text_dim=T.DIM)
    assert not unet(torch.randn(1, 3, 8, 8), torch.tensor([3]), None, words.pooled, words.tokens, words.mask).any()


@pytest.mark.parametrize("family, backbone", [("flow", "unet"), ("ddpm", "dit")])
def test_captioned_data_makes_a_text_run_and_a_seed_and_prompt_give_one_image(text_runs, family, backbone):
    run = imagegen.load_run(text_runs(family, backbone))
    assert run.model.reads_text and run.model.cfg.text_dim == T.DIM
    assert run.model.cfg.text_encoder == T.encoder_id()
    prompts = ["a red circle", "two blue squares", "a star left of a circle"]
    many = imagegen.generate(run.model, [4, 5, 6], prompts=prompts, negative_prompt="a green star", steps=3)
    one = imagegen.generate(run.model, [6], prompts=prompts[2:], negative_prompt="a green star", steps=3)
    assert torch.equal(many[2], one[0])                      # the same at batch 3 and batch 1
    other = imagegen.generate(run.model, [6], prompts="a red circle", negative_prompt="a green star", steps=3)
    assert not torch.equal(other[0], one[0])                 # the prompt matters (a few steps of training)


def test_a_share_of_captions_trains_on_their_first_phrase():
    """model.caption_short: batches carry each caption's first phrase, and the network reads it for the
    share drawn; at 0 nothing more is drawn, so a run without it keeps its random stream."""
    from imagegen.data.dataset import ImageDataset
    from imagegen.models.flow import Config, Flow
    captions = ["grinning face, happy, smile", "red apple, fruit, food", "a star", ", odd"]
    data = ImageDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.full((4,), -1), [], "t", "t", captions=captions)
    data.load_text(short=True)
    batch = data.batch(torch.arange(4))
    short, full = T.encode(["grinning face", "red apple", "a star", ", odd"]), T.encode(captions)
    n = short.tokens.shape[1]
    assert torch.equal(batch["short_pooled"], short.pooled) and torch.equal(batch["short_tokens"][:, :n], short.tokens)
    assert n < full.tokens.shape[1] == batch["text_tokens"].shape[1]

    def read(share, seed=0):
        flow = Flow(Config(image_size=8, channels=3, width=8, mults=(1, 2), text_dim=T.DIM, label_dropout=0.0,
                           caption_short=share))
        gen = torch.Generator().manual_seed(seed)
        return flow.training_text(batch, gen), gen
    (pooled, tokens, mask), _ = read(1.0)
    assert torch.equal(pooled, short.pooled) and torch.equal(mask.sum(1), short.mask.sum(1))
    assert torch.equal(tokens[:, :n], short.tokens) and not tokens[:, n:].any()
    (pooled, tokens, mask), gen = read(0.0)
    assert torch.equal(pooled, full.pooled) and torch.equal(tokens, full.tokens) and torch.equal(mask, full.mask)
    once = torch.Generator().manual_seed(0)
    torch.rand(4, generator=once)                                  # the caption dropout's draw, and no other
    assert torch.equal(gen.get_state(), once.get_state())
    cut = [sum(not torch.equal(read(0.5, seed)[0][0][i], full.pooled[i]) for seed in range(40)) for i in range(3)]
    assert 8 <= min(cut[:2]) <= max(cut[:2]) <= 32 and cut[2] == 0, cut   # about half of 40; "a star" is its own phrase


@pytest.mark.parametrize("short", [0.0, 0.5])
def test_a_text_run_resumes_bit_identically(tmp_path, short):
    """Caption dropout and the first-phrase draw use the run's generators too: a resumed text run is the
    straight one."""
    from imagegen.checkpoint import list_checkpoints, load_checkpoint
    from test_train import _assert_same_optim, _assert_same_tensors

    def cfg(steps):
        return imagegen.resolve_config({"family": "flow", "model": {"width": 8, "mults": [1, 2], "caption_short": short},
                                        "data": {"source": "scenes", "limit": 64},
                                        "train": {"steps": steps, "batch_size": 8, "sample_every": 0, "grid_size": 4,
                                                  "checkpoint_every": 3}})
    straight = imagegen.train(cfg(6), out=tmp_path / "a", progress=False)
    resumed = imagegen.train(cfg(6), resume=imagegen.train(cfg(3), out=tmp_path / "b", progress=False), progress=False)
    a, b = load_checkpoint(list_checkpoints(straight)[-1]), load_checkpoint(list_checkpoints(resumed)[-1])
    assert a["state"]["step"] == b["state"]["step"] == 6
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_tensors(a["ema"], b["ema"], "ema")
    _assert_same_optim(a["optimizers"], b["optimizers"])


def test_a_text_run_saved_before_text_levels_loads_as_it_was(tmp_path):
    """Runs saved before model.text_levels had cross-attention in the U-Net's middle only, and no position
    codes: their config.json has neither key, and must load to the network they were, not today's default."""
    import json
    cfg = imagegen.resolve_config({"family": "flow", "model": {"width": 8, "mults": [1, 2], "text_levels": 0,
                                                               "text_positions": False},
                                   "data": {"source": "scenes", "limit": 64},
                                   "train": {"steps": 1, "batch_size": 8, "sample_every": 0, "grid_size": 4}})
    run_dir = imagegen.train(cfg, out=tmp_path, progress=False)
    before = imagegen.generate(imagegen.load_run(run_dir).model, [0, 1], prompts="a red star", steps=2)
    saved = json.loads((run_dir / "config.json").read_text())
    del saved["model"]["text_levels"], saved["model"]["text_positions"]
    (run_dir / "config.json").write_text(json.dumps(saved))
    run = imagegen.load_run(run_dir)
    assert run.model.cfg.text_levels == 0 and not run.model.net.down_text and not run.model.cfg.text_positions
    assert torch.equal(imagegen.generate(run.model, [0, 1], prompts="a red star", steps=2), before)
    new = imagegen.resolve_config({"family": "flow"}).model                     # a new run gets today's
    assert new.text_levels == 2 and new.text_positions


def test_a_prompt_for_a_model_without_text_and_a_wrong_count_are_errors(text_runs, tiny_run):
    dcgan = imagegen.load_run(tiny_run).model
    with pytest.raises(ConfigError, match="not trained on captions"):
        imagegen.generate(dcgan, [0], prompts="a red circle")
    model = imagegen.load_run(text_runs("flow")).model
    with pytest.raises(ConfigError, match="2 prompts for 3 seeds"):
        imagegen.generate(model, [0, 1, 2], prompts=["a", "b"], steps=2)


def test_sample_takes_a_prompt_or_a_prompts_file(text_runs, tmp_path, capsys):
    run = text_runs("flow")
    assert cli_main(["sample", str(run), "--seeds", "0-1", "--prompt", "a red circle", "--steps", "2",
                     "--out", str(tmp_path / "a")]) == 0
    (tmp_path / "p.txt").write_text("a red circle\n\ntwo stars\n")
    assert cli_main(["sample", str(run), "--seeds", "0-1", "--prompts", str(tmp_path / "p.txt"), "--steps", "2",
                     "--out", str(tmp_path / "b")]) == 0
    first = [(tmp_path / d / "seed000000.png").read_bytes() for d in "ab"]
    assert first[0] == first[1]                              # seed 0 had "a red circle" both times
    assert cli_main(["sample", str(run), "--seeds", "0-2", "--prompts", str(tmp_path / "p.txt"),
                     "--out", str(tmp_path / "c")]) == 2
    assert "2 prompts for 3 seeds" in capsys.readouterr().err


def test_the_api_takes_a_prompt_and_refuses_bad_ones(text_runs, tiny_run, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from conftest import LOCAL

    from imagegen.serve import create_app
    shutil.copytree(text_runs("flow"), tmp_path / "text")
    shutil.copytree(tiny_run, tmp_path / "gan")
    with TestClient(create_app(tmp_path, log=None), raise_server_exceptions=False, base_url=LOCAL) as c:
        info = {m["name"]: m for m in c.get("/api/models").json()}
        assert info["text"]["text"] and not info["gan"]["text"]
        r = c.post("/api/generate", json={"model": "text", "seed": 3, "prompt": "a red star", "steps": 2})
        assert r.status_code == 200 and "--prompt 'a red star'" in r.headers["X-Imagegen-Command"]
        r = c.post("/api/generate", json={"model": "text", "seed": 3, "prompt": "a red\nstar\t", "steps": 2})
        assert r.status_code == 200 and "a red\\nstar\\t" in r.headers["X-Imagegen-Command"]   # not a 500
        for body, code in [({"model": "text", "prompt": ""}, 400), ({"model": "text", "prompt": "w " * 60}, 400),
                           ({"model": "gan", "prompt": "a red star"}, 400), ({"model": "text", "prompt": "x" * 301}, 422)]:
            assert c.post("/api/generate", json=body).status_code == code, body


def test_a_text_run_is_evaluated_on_test_captions_and_on_following_class_prompts(evaluators, tmp_path):
    from imagegen.data import captions as C
    from imagegen.evaluate.run_eval import evaluate_run
    ev, _ = evaluators
    # two solver steps: the evaluation draws 100 images per class and prompt set, which is what is tested
    cfg = imagegen.resolve_config({"family": "flow", "model": {"width": 8, "mults": [1, 2], "sample_steps": 2},
                                   "data": {"source": "captioned:shapes", "limit": 64},
                                   "train": {"steps": 4, "batch_size": 8, "sample_every": 0, "grid_size": 4}})
    run_dir = imagegen.train(cfg, out=tmp_path, progress=False)
    run = imagegen.load_run(run_dir)
    assert run.model.reads_text and run.model.num_classes == 0      # captions, not classes, condition it
    out = evaluate_run(run_dir, n=20, extractor=ev, log=None)
    assert out["protocol"]["prompts"].startswith("the test split's captions")
    following = out["protocol"]["prompt_following"]
    assert set(following["per_class"]) == set(C.PHRASES) & set(ev.info["classes"]) == {"circle", "square", "triangle", "star"}
    for name in ("training_prompts", "held_out_prompts"):
        assert 0 <= out["metrics"][f"prompt_accuracy_{name}"] <= 1
        assert out["metrics"][f"prompt_accuracy_{name}"] == following[name]


def test_the_page_has_a_prompt_box_for_a_text_model(text_runs, tiny_run, tmp_path):
    import shutil

    from playwright.sync_api import sync_playwright

    from conftest import live_server
    shutil.copytree(text_runs("flow"), tmp_path / "text")
    shutil.copytree(tiny_run, tmp_path / "gan")
    with live_server(tmp_path) as port, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(bypass_csp=True)   # wait_for_function evaluates with eval(), which the page's CSP forbids
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 2")
        page.select_option("#model", "gan")
        assert page.is_hidden("#prompt-row")                                  # a GAN takes no prompt
        page.select_option("#model", "text")
        page.wait_for_selector("#prompt-row", state="visible")
        page.fill("#opt-steps", "2")
        page.fill("#prompt", "a blue star")
        page.wait_for_function("document.getElementById('command').textContent.includes(\"--prompt 'a blue star'\")"
                               " && document.getElementById('image').complete")
        assert page.is_hidden("#error")
        page.fill("#prompt", "")                                                 # the server says why not
        page.wait_for_selector("#error", state="visible")
        assert "empty" in page.inner_text("#error")
        browser.close()


@pytest.mark.trained
def test_text_flow_exports_to_onnx_with_its_prompt_inputs(text_runs, tmp_path):
    """The exported velocity graph takes a prompt as text_pooled, text_tokens and text_mask (any number
    of token slots) and gives the library's guided velocity for it, to 1e-4 (issue 18)."""
    import onnxruntime as ort
    from imagegen.export import export_onnx
    from imagegen.text import encode
    run = imagegen.load_run(text_runs("flow"))
    done = export_onnx(run, tmp_path / "t.onnx")
    assert list(done.inputs) == ["x", "time", "text_pooled", "text_tokens", "text_mask"]
    words = encode(["a large red star in the top left", "two blue squares"])       # its own token count
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0.25, 0.75])
    want = run.model.velocity(None, 1.0, words)(x, t[0].item())[:1]
    want = torch.cat([want, run.model.velocity(None, 1.0, words)(x, t[1].item())[1:]])
    sess = ort.InferenceSession(str(done.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy(), "time": t.numpy(), "text_pooled": words.pooled.numpy(),
                          "text_tokens": words.tokens.numpy(), "text_mask": words.mask.numpy()})[0]
    assert (torch.from_numpy(got) - want).abs().max() <= 1e-4 and want.abs().max() > 1e-3
