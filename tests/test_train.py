"""The training loop: exact resume, the non-finite guard, config errors."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

import imagegen
from imagegen.checkpoint import list_checkpoints, load_checkpoint
from imagegen.errors import ConfigError, TrainingError
from imagegen.models import REGISTRY
from imagegen.models.base import Family

from conftest import tiny_config


def _assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _assert_same_optim(a: dict, b: dict):
    for name in a:
        sa, sb = a[name]["state"], b[name]["state"]
        assert sa.keys() == sb.keys()
        for pid in sa:
            for k in sa[pid]:
                va, vb = sa[pid][k], sb[pid][k]
                assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, f"optimizer {name} {pid} {k}"


@pytest.mark.parametrize("loss,sn", [("ns", False), ("hinge", True), ("wgan-gp", False)])
def test_resume_is_bit_identical(tmp_path, loss, sn):
    model = {"loss": loss, "spectral_norm": sn}
    straight = imagegen.train(tiny_config(20, model=model), out=tmp_path / "a", progress=False)
    half = imagegen.train(tiny_config(10, model=model), out=tmp_path / "b", progress=False)
    resumed = imagegen.train(tiny_config(20, model=model), resume=half, progress=False)
    assert resumed == half
    a, b = load_checkpoint(list_checkpoints(straight)[-1]), load_checkpoint(list_checkpoints(resumed)[-1])
    assert a["state"]["step"] == b["state"]["step"] == 20
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_tensors(a["ema"], b["ema"], "ema")
    _assert_same_optim(a["optimizers"], b["optimizers"])
    # the log of the resumed run continues where it stopped
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


def test_resume_auto_continues_the_newest_run_of_the_same_config(tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    first = imagegen.train(tiny_config(10), out=out, progress=False)
    other_seed = imagegen.train(tiny_config(10, train={"seed": 1}), out=out, progress=False)
    # A newer folder of the same config without a checkpoint (another job, just started) is never chosen.
    (out / "00009-shapes-dcgan").mkdir()
    (out / "00009-shapes-dcgan" / "config.json").write_text((first / "config.json").read_text())
    # What may change on resume (steps, device, precision, logger) still finds the run; the rest does not.
    continued = imagegen.train(tiny_config(20, train={"precision": "fp32"}), out=out, resume="auto", progress=False)
    assert continued == first and imagegen.load_run(first).step == 20
    straight = imagegen.train(tiny_config(20), out=tmp_path / "straight", progress=False)
    _assert_same_tensors(load_checkpoint(list_checkpoints(straight)[-1])["model"],
                         load_checkpoint(list_checkpoints(first)[-1])["model"], "auto-resumed vs straight")
    # Already there: nothing to train, nothing rewritten.
    before = (first / "config.json").read_text(), (first / "log.jsonl").read_text()
    assert imagegen.train(tiny_config(15), out=out, resume="auto", progress=False) == first
    assert ((first / "config.json").read_text(), (first / "log.jsonl").read_text()) == before
    assert "already at step 20" in capsys.readouterr().out
    # A config no run holds, and "never", start new runs; so does None outside torchrun's agent.
    new = imagegen.train(tiny_config(10, model={"z_dim": 8}), out=out, resume="auto", progress=False)
    assert new not in (first, other_seed) and imagegen.load_run(new).step == 10
    assert imagegen.train(tiny_config(20), out=out, resume="never", progress=False) not in (first, new)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert imagegen.train(tiny_config(20), out=out, progress=False) not in (first, new)
    # An explicit run folder already at --steps is still an error.
    with pytest.raises(ConfigError, match="already at step 20"):
        imagegen.train(tiny_config(20), resume=first, progress=False)


def test_a_resumed_log_drops_the_lines_after_its_checkpoint(tmp_path):
    """A killed run may have logged past its last checkpoint, and left its last line half-written."""
    run = imagegen.train(tiny_config(10), out=tmp_path, progress=False)
    with (run / "log.jsonl").open("a") as f:
        f.write('{"step": 15, "loss_d": 1.0}\n{"step": 20, "lo')
    imagegen.train(tiny_config(20), resume=run, progress=False)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


def test_losses_are_finite_and_training_moves_the_weights(tmp_path):
    run_dir = imagegen.train(tiny_config(10), out=tmp_path, progress=False)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in records)
    trained = load_checkpoint(list_checkpoints(run_dir)[-1])
    with torch.random.fork_rng():  # the weights the run started from (built under train.seed = 0)
        torch.manual_seed(0)
        fresh = imagegen.build_model("dcgan", json.loads((run_dir / "config.json").read_text())["model"])
    assert not torch.equal(trained["model"]["G.project.weight"], fresh.state_dict()["G.project.weight"])


# A test family whose loss turns NaN on chosen steps: it checks the loop's guard, which must work for
# any family without the family knowing about it.
@dataclass
class FlakyConfig:
    image_size: int = 32
    channels: int = 3
    nan_from: int = 3
    nan_until: int = 6


class Flaky(Family):
    Config = FlakyConfig
    name = "flaky"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.w = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("calls", torch.zeros(()))   # a buffer: rolled back by the loop on bad steps
        self.n_calls = 0                                  # a plain attribute: counts every call

    def configure_optimizers(self, train_cfg):
        return {"w": torch.optim.SGD([self.w], lr=0.1)}

    def train_step(self, batch, opt, gen):
        self.calls += 1
        self.n_calls += 1
        x = batch["image"].mean()
        if self.cfg.nan_from <= self.n_calls <= self.cfg.nan_until:
            x = x * float("nan")
        loss = (self.w * x).sum() + (self.w ** 2).sum()
        opt["w"].zero_grad()
        loss.backward()
        opt["w"].step()
        return {"loss": loss.item()}

    def sample(self, n, *, labels=None, generator=None, **opts):
        return torch.zeros(n, 3, 32, 32)


@pytest.fixture
def flaky_family():
    REGISTRY["flaky"] = Flaky
    yield
    del REGISTRY["flaky"]


def test_guard_skips_non_finite_steps_and_keeps_weights_finite(tmp_path, flaky_family):
    cfg = imagegen.resolve_config({"family": "flaky", "data": {"source": "shapes", "limit": 64},
                                   "train": {"steps": 10, "batch_size": 8, "log_every": 10, "sample_every": 0,
                                             "grid_size": 4, "max_bad_steps": 5}})
    run_dir = imagegen.train(cfg, out=tmp_path, progress=False)
    rec = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    assert rec["bad_steps"] == 4
    ckpt = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert torch.isfinite(ckpt["model"]["w"]).all()
    # the buffer updated during the bad steps was rolled back: 10 calls, 4 of them undone
    assert int(ckpt["model"]["calls"]) == 6


def test_guard_stops_after_k_bad_steps_in_a_row(tmp_path, flaky_family):
    cfg = imagegen.resolve_config({"family": "flaky", "model": {"nan_from": 2, "nan_until": 100},
                                   "data": {"source": "shapes", "limit": 64},
                                   "train": {"steps": 50, "batch_size": 8, "sample_every": 0, "grid_size": 4,
                                             "max_bad_steps": 3}})
    with pytest.raises(TrainingError, match="3 steps in a row"):
        imagegen.train(cfg, out=tmp_path, progress=False)


def test_unknown_keys_and_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="model.widht"):
        imagegen.resolve_config({"family": "dcgan", "model": {"widht": 3}})
    with pytest.raises(ConfigError, match="train.steps"):
        imagegen.resolve_config({"family": "dcgan", "train": {"steps": "many"}})
    with pytest.raises(ConfigError, match="'ns'"):
        imagegen.resolve_config({"family": "dcgan", "model": {"loss": "lsgan"}})
    with pytest.raises(ConfigError, match=r"train.steps must be in 1\.\.1000000000, got 0"):
        imagegen.resolve_config({"family": "dcgan", "train": {"steps": 0}})
    with pytest.raises(ConfigError, match="unknown model"):
        imagegen.resolve_config({"family": "nope"})
    with pytest.raises(ConfigError, match="image_size 30"):
        imagegen.resolve_config({"family": "dcgan", "model": {"image_size": 30}})
    with pytest.raises(ConfigError, match="per-sample gradient penalty"):
        imagegen.resolve_config({"family": "dcgan", "model": {"loss": "wgan-gp", "d_norm": "batch"}})


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 3)])
def test_dcgan_shapes(size, channels):
    model = imagegen.build_model("dcgan", {"image_size": size, "channels": channels, "width": 4, "z_dim": 8})
    x = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, channels, size, size)
    assert model.D(x).shape == (3,)


@pytest.mark.parametrize("family,sn", [("dcgan", False), ("dcgan", True), ("cgan", False), ("cgan", True)])
def test_discriminator_reads_channels_last_maps_without_a_copy_and_the_same_logits(family, sn):
    # D's head reads a channels-last feature map in its memory order with its weight's columns permuted
    # (models/base.flat_view): the logits must be those of the C-major flatten, and the gradient must come
    # back channels-last (a copy to NCHW there is what the permutation avoids).
    cfg = {"image_size": 28, "channels": 1, "width": 8, "spectral_norm": sn, **({"num_classes": 3} if family == "cgan" else {})}
    model = imagegen.build_model(family, cfg).eval()
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1]) if family == "cgan" else None
    with torch.no_grad():
        h = model.D.features(x)
        want = model.D.head(h.flatten(1)).squeeze(1)
        if y is not None:
            want = want + (model.D.embed(y) * h.flatten(1)).sum(1)
        assert torch.equal(model.D(x, y), want)               # NCHW: the flatten itself, bit for bit
    model.to(memory_format=torch.channels_last)
    seen = {}
    def keep_grad(module, inputs, h):
        h.register_hook(lambda g: seen.setdefault("grad", g))
    model.D.features.register_forward_hook(keep_grad)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    got = model.D(xc, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)   # another summation order only
    got.sum().backward()
    assert seen["grad"].is_contiguous(memory_format=torch.channels_last) and not seen["grad"].is_contiguous()


def test_keep_freed_memory_stops_the_page_faults_of_a_reallocated_block():
    # glibc by default maps a freed 40 MB block back to the OS, so allocating it again faults in every
    # page (about 10,000); once train() has called keep_freed_memory the block stays in the heap. Run in
    # a fresh interpreter: this process may have trained already, which sets it. The first one or two
    # reallocations after the call may still fault while the heap grows to take the block (seen under
    # AVX2: [9766, 9765, 0, 0, ...]); from then on each reuses it, so the test asks the median of eight.
    import statistics
    import subprocess
    import sys
    script = """
import resource, torch
from imagegen.runtime.host import keep_freed_memory
def faults():
    x = torch.empty(10_000_000); x.fill_(1); del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.empty(10_000_000); y.fill_(1); del y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[faults() for _ in range(3)], keep_freed_memory(), *[faults() for _ in range(8)])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    default, took, kept = [int(v) for v in out[:3]], out[3] == "True", [int(v) for v in out[4:]]
    if not took:
        pytest.skip("not glibc: keep_freed_memory changes nothing here")
    assert min(default) > 5000, f"expected a fresh mapping each time by default, got {default} page faults"
    assert statistics.median(kept) < 500, f"the freed block should be reused: {kept} page faults (default {default})"


def test_a_time_budget_shows_its_progress_in_seconds(tmp_path, capsys):
    """Under train.time_limit the bar counts the budget's seconds, not the (usually far too many) steps,
    so its ETA is the time left, and the run still ends at the budget."""
    cfg = tiny_config(steps=1_000_000, train={"time_limit": 2.0})
    run_dir = imagegen.train(cfg, out=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "time budget" in err and "/2 s" in err and "1000000" not in err
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert 0 < steps[-1] < 1_000_000
    run_dir = imagegen.train(tiny_config(steps=3), out=tmp_path, progress=True)
    assert "3/3" in capsys.readouterr().err                   # no budget: steps, as before
