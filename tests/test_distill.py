"""`imagegen distill`: couplings from flow and ddpm teachers, the student run folder (loads, samples per
seed, names its teacher, resumes exactly), what the student learns, and the errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import imagegen
from imagegen.distill import COUPLING_SEEDS, couplings, distill, teacher_hash
from imagegen.errors import ConfigError
from imagegen.sample import default_labels, generate, seed_generators, to_float
from imagegen.models.base import per_item_normal

from conftest import read_only, run_main, run_maker

TEACHERS = {
    "flow": ("flow", {"width": 8, "mults": [1, 2], "sample_steps": 3}),
    "ddpm": ("ddpm", {"width": 8, "mults": [1, 2], "sample_steps": 3}),
}
STUDENT = ["model.width=8", "model.mults=[1, 2]", "train.batch_size=16", "train.sample_every=0",
           "train.checkpoint_every=3", "train.log_every=1"]


@pytest.fixture(scope="module")
def teachers(request, tmp_path_factory):
    return run_maker(request, tmp_path_factory, TEACHERS, steps=6)


@pytest.fixture(scope="module")
def student(request, teachers, tmp_path_factory):
    return read_only(request, distill(teachers("flow"), steps=1, out=tmp_path_factory.mktemp("student"), pairs=32,
                                      train_steps=6, overrides=STUDENT, progress=False))


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_couplings_are_the_teachers_own_samples_of_their_noise(kind, teachers):
    teacher = imagegen.load_run(teachers(kind))
    pairs = couplings(teacher, 20, batch_size=7, progress=False)
    seeds = list(range(COUPLING_SEEDS, COUPLING_SEEDS + 20))
    shape = pairs.images.shape[1:]
    assert torch.equal(pairs.noise, per_item_normal(20, tuple(shape), seed_generators(seeds), torch.device("cpu")))
    labels = default_labels(teacher.model, seeds)
    assert torch.equal(pairs.labels, labels)
    # flow: the ODE from that noise; ddpm: DDIM with eta 0 from it, as `sample` draws the same seed
    opts = {"eta": 0.0, "sampler": "ddim"} if kind == "ddpm" else {}
    want = generate(teacher.model, seeds, labels=labels, **opts)
    assert (to_float(pairs.images) - want).abs().max() <= 1 / 127.5 + 1e-6      # 8-bit rounding only


def test_the_student_run_names_its_teacher_and_samples_like_any_run(student, teachers, tmp_path):
    cfg = json.loads((student / "config.json").read_text())
    teacher = teachers("flow")
    assert cfg["family"] == "distilled" and cfg["model"]["teacher_family"] == "flow"
    assert cfg["model"]["teacher_sha256"] == teacher_hash(teacher) and cfg["model"]["pairs"] == 32
    assert cfg["model"]["teacher"] == str(teacher.resolve()) and "heun" in cfg["model"]["teacher_sampler"]
    run = imagegen.load_run(student)
    seeds = list(range(10))
    labels = default_labels(run.model, seeds)
    a = generate(run.model, seeds, labels=labels)
    assert a.shape == (10, 3, 32, 32) and a.abs().max() <= 1
    assert torch.equal(a[[3, 7]], generate(run.model, [3, 7], labels=labels[[3, 7]], batch_size=1))
    r = run_main("sample", str(student), "--seeds", "0-3", "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s").glob("*.png"))) == 4


def test_a_distilled_run_resumes_exactly(teachers, tmp_path):
    teacher = teachers("flow")
    whole = distill(teacher, out=tmp_path / "a", pairs=32, train_steps=6, overrides=STUDENT, progress=False)
    half = distill(teacher, out=tmp_path / "b", pairs=32, train_steps=3, overrides=STUDENT, progress=False)
    assert (half / "couplings.safetensors").exists()        # kept: the resume does not ask the teacher again
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("imagegen.distill.couplings", lambda *a, **k: pytest.fail("the couplings were drawn again"))
        again = distill(teacher, resume=half, train_steps=6, progress=False)
    w, h = imagegen.load_run(whole).model.state_dict(), imagegen.load_run(again).model.state_dict()
    assert all(torch.equal(w[k], h[k]) for k in w)


@pytest.mark.trained
def test_the_student_learns_the_teachers_map(teachers, tmp_path):
    # Regression onto 32 fixed couplings: the squared error of the student's one step, x1 - z against its
    # velocity, falls as it fits them (measured, default student at width 16: 0.149 -> 0.041 in 150 steps,
    # a factor 3.6, under AVX-512, AVX2 and SSE4.1 alike).
    overrides = [o for o in STUDENT if not o.startswith(("train.batch_size", "train.log_every"))]
    run = distill(teachers("flow"), out=tmp_path, pairs=32, train_steps=150, progress=False,
                  overrides=overrides + ["model.width=16", "train.batch_size=32", "train.log_every=10", "model.adversarial=0"])
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 2.5, losses


def test_distill_refuses_what_it_cannot_distil(teachers, tiny_run, tmp_path):
    r = run_main("distill", str(tiny_run), "--out", str(tmp_path))
    assert r.returncode == 2 and "flow or ddpm" in r.stderr and "Traceback" not in r.stderr
    r = run_main("distill", str(teachers("flow")), "--steps", "3", "--out", str(tmp_path))
    assert r.returncode == 2 and "must be 1, 2 or 4" in r.stderr
    r = run_main("train", "--data", "shapes", "--model", "distilled", "--out", str(tmp_path))
    assert r.returncode == 2 and "imagegen distill" in r.stderr
    with pytest.raises(ConfigError, match="not a distilled run"):
        distill(teachers("flow"), resume=tiny_run, progress=False)


def test_train_resume_of_a_distilled_run_says_how_to_continue_it(student, tmp_path):
    run = shutil.copytree(student, tmp_path / "s")
    r = run_main("train", "--resume", str(run), "--steps", "8")
    assert r.returncode == 2 and "imagegen distill" in r.stderr


def test_a_new_student_reuses_anothers_couplings_without_the_teacher(student, teachers, tmp_path):
    teacher = teachers("flow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("imagegen.distill.couplings", lambda *a, **k: pytest.fail("the couplings were drawn again"))
        other = distill(teacher, out=tmp_path, pairs=32, train_steps=2, couplings_from=student, progress=False,
                        overrides=STUDENT + ["model.width=4"])
    assert (other / "couplings.safetensors").read_bytes() == (student / "couplings.safetensors").read_bytes()
    assert imagegen.load_run(other).model.cfg.width == 4
    # More pairs than it keeps: only the missing ones are drawn, and the whole set is what one draw gives.
    drawn, real_couplings = [], couplings
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("imagegen.distill.couplings", lambda *a, **k: drawn.append((a[1], k["first"])) or real_couplings(*a, **k))
        more = distill(teacher, out=tmp_path / "more", pairs=48, train_steps=2, couplings_from=student, progress=False,
                       overrides=STUDENT)
    assert drawn == [(16, 32)]
    kept = load_file(more / "couplings.safetensors")
    whole = couplings(imagegen.load_run(teacher), 48, progress=False)
    assert torch.equal(kept["images"], whole.images) and torch.equal(kept["labels"], whole.labels)
    with pytest.raises(ConfigError, match="keeps no couplings .* up to --pairs 16"):
        distill(teacher, out=tmp_path, pairs=16, train_steps=2, couplings_from=student, progress=False, overrides=STUDENT)
    with pytest.raises(ConfigError, match="same teacher steps"):
        distill(teacher, out=tmp_path, pairs=32, teacher_steps=3, train_steps=2, couplings_from=student,
                progress=False, overrides=STUDENT)
    with pytest.raises(ConfigError, match="not a student"):
        distill(teacher, out=tmp_path, pairs=32, train_steps=2, couplings_from=teacher, progress=False, overrides=STUDENT)
