"""Two-stage text-to-image on data with layouts (nets/layout.py, issue 16): the `scenes` ground truth and
naming order reach the batches, the layout prior's codes and sampling, the backbones drawing to a
layout, and a grounded run whose layouts, like its images, depend only on the seed and the prompt."""

from __future__ import annotations

import json

import pytest
import torch

import imagegen
from imagegen import text as T
from imagegen.data import load_data
from imagegen.data import scenes as S
from imagegen.evaluate.geneval import parse_caption
from imagegen.nets.dit import DiT
from imagegen.nets.layout import LayoutPrior
from imagegen.nets.unet import UNet

pytestmark = pytest.mark.usefixtures("private_cache")


def _cfg(steps: int = 4, **model):
    return imagegen.resolve_config({"family": "flow", "model": {"width": 8, "mults": [1, 2], **model},
                                    "data": {"source": "scenes", "limit": 64},
                                    "train": {"steps": steps, "batch_size": 8, "sample_every": 0, "grid_size": 4,
                                              "checkpoint_every": steps}})


@pytest.fixture(scope="module")
def grounded_run(tmp_path_factory):
    return imagegen.train(_cfg(), out=tmp_path_factory.mktemp("grounded"), progress=False)


def test_scenes_name_their_objects_in_order_and_batches_carry_the_layouts():
    sc = S.make_scenes("test", first=300)
    for caption, cells, order in zip(sc.captions[:300], sc.cells.tolist(), sc.order.tolist()):
        prompt = parse_caption(caption)
        named = [c for c in order if c >= 0]
        assert sorted(named) == [i for i, c in enumerate(cells) if c]          # every object, once
        if prompt.task != "counting":                                           # the k-th phrase is the k-th object
            assert all(w.matches(S.decode_cell(cells[c]), c) for w, c in zip(prompt.objects, named))
    ds = load_data("scenes")
    assert ds.layout_grid == 3 and ds.layout_classes == S.CELL_CLASSES and ds.layout_order.shape[1] == S.MAX_OBJECTS
    batch = ds.batch(torch.tensor([5, 1]))
    assert torch.equal(batch["layout"], S.make_scenes("train").cells[[5, 1]])
    assert torch.equal(batch["layout_order"], S.make_scenes("train").order[[5, 1]])


def test_the_prior_reads_and_writes_layouts_through_its_codes():
    """Forced to choose the true codes (one-hot logits), sampling writes back exactly the true grids, at
    random uniforms as at argmax; a taken cell is not chosen again, and after STOP nothing is."""
    sc = S.make_scenes("train", first=1000)
    prior = LayoutPrior(T.DIM, 3, S.CELL_CLASSES, S.MAX_OBJECTS).eval()
    layout, order = sc.cells[:200], sc.order[:200]
    codes = prior.codes(layout, order)
    assert codes.shape == (200, 3) and (codes[order < 0] == 0).all() and (codes[order >= 0] > 0).all()
    forced = torch.full((200, 3, prior.choices), -30.0).scatter(2, codes[..., None], 30.0)
    prior.forward = lambda pooled, tokens, mask, c: forced[:len(c)]
    words = T.TextEmbedding.null(200, 1)
    for u in (None, torch.rand(200, 3, generator=torch.Generator().manual_seed(0))):
        assert torch.equal(prior.sample(words.pooled, words.tokens, words.mask, u), layout)
    # a taken cell cannot be chosen again: all three slots like cell 0 best, then cell 4, then cell 8
    def code(cell, cls):
        return 1 + cell * (S.CELL_CLASSES - 1) + cls - 1
    liked = torch.full((1, 3, prior.choices), -30.0)
    liked[..., code(0, 1)], liked[..., code(4, 2)], liked[..., code(8, 3)] = 30.0, 20.0, 10.0
    prior.forward = lambda pooled, tokens, mask, c: liked.expand(len(c), -1, -1)
    got = prior.sample(words.pooled[:1], words.tokens[:1], words.mask[:1], None)
    assert got.tolist() == [[1, 0, 0, 0, 2, 0, 0, 0, 3]]
    liked[..., 0] = 25.0                                                      # STOP after the first: only one
    assert prior.sample(words.pooled[:1], words.tokens[:1], words.mask[:1], None).tolist() == [[1] + [0] * 8]


@pytest.mark.parametrize("make", [lambda: UNet(3, 8, (1, 2), text_dim=T.DIM, layout=(3, S.CELL_CLASSES)),
                                  lambda: DiT(3, "xxs", patch=4, text_dim=T.DIM, layout=(3, S.CELL_CLASSES))],
                         ids=["unet", "dit"])
def test_a_backbone_draws_each_cell_where_its_layout_puts_it(make):
    """The layout starts at zero (a grounded network starts as the text network); once it is learnt, a
    cell's class changes the output in that cell's third of the image far more than elsewhere, and no
    layout is the null layout."""
    torch.manual_seed(0)
    net = make().eval()
    words = T.encode(["a red circle"])
    x, t = torch.randn(1, 3, 24, 24), torch.tensor([500])
    empty = torch.zeros(1, 9, dtype=torch.long)
    star = empty.clone()
    star[0, 0] = S.cell_code(3, 0, 1)                                         # a large red star, top left
    with torch.no_grad():
        for m in net.modules():
            if type(m).__name__ == "LayoutIn":
                assert not m.embed.weight.any()
                m.embed.weight.normal_(0, 1.0)
        if isinstance(net, UNet):
            for p in net.parameters():   # zero-initialised convolutions would hide where the layout goes
                if not p.any():
                    p.normal_(0, 0.1)
        else:
            for block in net.blocks:
                block.ada[-1].weight.normal_(0, 0.1)
            net.out.weight.normal_(0, 0.1)
            net.ada[-1].weight.normal_(0, 0.1)
        run = lambda lay: net(x, t, None, words.pooled, words.tokens, words.mask, lay)   # noqa: E731
        diff = (run(star) - run(empty)).abs().mean(1)[0]                         # 24 x 24
        null = torch.full((1, 9), S.CELL_CLASSES)
        assert torch.equal(run(None), run(null))
    inside, outside = diff[:8, :8].mean(), diff[12:, 12:].mean()
    assert inside > 3 * outside, (inside.item(), outside.item())


@pytest.mark.rounding
def test_a_grounded_run_draws_a_layout_per_seed_at_any_batch_size(grounded_run):
    run = imagegen.load_run(grounded_run)
    m = run.model
    assert (m.cfg.layout_grid, m.cfg.layout_classes, m.cfg.layout_slots) == (3, S.CELL_CLASSES, S.MAX_OBJECTS)
    assert m.layout_prior is not None
    prompts = ["a red circle", "two blue squares", "a star left of a circle"]
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]   # noqa: E731
    many = m.ground(T.encode(prompts), gens([4, 5, 6]))
    one = m.ground(T.encode(prompts[2:]), gens([6]))
    assert torch.equal(many.layout[2], one.layout[0])
    assert not torch.equal(m.ground(T.encode(prompts[2:] * 8), gens(range(8))).layout,
                           m.ground(T.encode(prompts[2:] * 8), gens(range(8, 16))).layout)   # the seed draws it
    assert torch.equal(m.ground(T.encode(prompts), None, draw=False).layout,
                       m.ground(T.encode(prompts), None, draw=False).layout)                # from_noise: the likeliest
    a = imagegen.generate(m, [4, 5, 6], prompts=prompts, negative_prompt="a green star", steps=3)
    b = imagegen.generate(m, [6], prompts=prompts[2:], negative_prompt="a green star", steps=3)
    assert torch.equal(a[2], b[0])


def test_the_layout_is_learnt_with_the_images_and_resumes_bit_identically(tmp_path):
    from imagegen.checkpoint import list_checkpoints, load_checkpoint
    from test_train import _assert_same_optim, _assert_same_tensors
    straight = imagegen.train(_cfg(6), out=tmp_path / "a", progress=False)
    half = imagegen.train(_cfg(3), out=tmp_path / "b", progress=False)
    resumed = imagegen.train(_cfg(6), resume=half, progress=False)
    a, b = load_checkpoint(list_checkpoints(straight)[-1]), load_checkpoint(list_checkpoints(resumed)[-1])
    assert set(a["optimizers"]) == {"net", "layout"}
    assert any(k.startswith("layout_prior.") for k in a["model"])
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_optim(a["optimizers"], b["optimizers"])
    first = imagegen.load_run(imagegen.train(_cfg(1), out=tmp_path / "c", progress=False)).model.state_dict()
    moved = [k for k in first if k.startswith("layout_prior.") and not torch.equal(first[k], a["model"][k])]
    assert moved                                                             # the prior trains


def test_grounded_false_trains_the_text_model_alone_and_older_runs_load_without_a_layout(tmp_path):
    run_dir = imagegen.train(_cfg(1, grounded=False), out=tmp_path, progress=False)
    run = imagegen.load_run(run_dir)
    assert run.model.layout_prior is None and run.model.cfg.layout_grid == 0 and run.model.reads_text
    before = imagegen.generate(run.model, [0, 1], prompts="a red star", steps=2)
    saved = json.loads((run_dir / "config.json").read_text())
    for key in ("grounded", "layout_grid", "layout_classes", "layout_slots"):   # a run saved before layouts
        del saved["model"][key]
    (run_dir / "config.json").write_text(json.dumps(saved))
    again = imagegen.load_run(run_dir)
    assert again.model.layout_prior is None
    assert torch.equal(imagegen.generate(again.model, [0, 1], prompts="a red star", steps=2), before)


def test_layout_fields_without_text_or_incomplete_are_refused():
    from imagegen.errors import ConfigError
    with pytest.raises(ConfigError, match="layout_grid"):
        imagegen.resolve_config({"family": "flow", "model": {"layout_grid": 3}})


def test_the_layout_priors_first_stage_scales_with_the_runs_steps(monkeypatch):
    """`layout_epochs` passes, but at most LAYOUT_UPDATES_PER_STEP updates per step of the run's budget
    (and at least LAYOUT_MIN_UPDATES): a 3-step smoke run does not fit the prior for minutes first."""
    from imagegen.models import backbone
    from imagegen.train import fit_model_to_data
    cfg = _cfg(layout_epochs=100.0)      # 64 captions, 32 a batch: 200 updates
    ds = load_data(cfg.data)
    cfg = fit_model_to_data(cfg, ds)
    ds.load_text(log=lambda *_: None)
    counted = []
    real = backbone.BackboneFamily.layout_loss
    monkeypatch.setattr(backbone.BackboneFamily, "layout_loss", lambda self, b: counted.append(1) or real(self, b))
    for steps, updates in ((None, 200), (30, 4 * 30), (3, backbone.LAYOUT_MIN_UPDATES), (1000, 200)):
        counted.clear()
        imagegen.REGISTRY["flow"](cfg.model).prepare(ds, steps=steps)
        assert len(counted) == updates, (steps, len(counted))
