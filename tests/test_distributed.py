"""Multi-process training on CPU with gloo: ranks stay bit-identical, 2 x B/2 equals 1 x B, a dead rank
ends the run, resume is exact, torchrun works, and mixed precision is chosen and checked."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import imagegen
from imagegen import distributed
from imagegen.checkpoint import list_checkpoints, load_checkpoint
from imagegen.errors import ConfigError
from imagegen.train import autocast_dtype

from conftest import free_port, run_main
from test_train import _assert_same_optim, _assert_same_tensors

WORKER = str(Path(__file__).parent / "ddp_worker.py")
TINY_DCGAN = {"family": "dcgan", "model": {"width": 8, "z_dim": 16}, "data": {"source": "shapes", "limit": 256},
              "train": {"batch_size": 16, "log_every": 1, "sample_every": 0, "grid_size": 4, "checkpoint_every": 10}}


def rank_env(rank: int, world: int, port: int) -> dict:
    # One thread per process: two processes share the 2 CI cores.
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def start(world: int, tree: dict, out: Path, *, resume=None, dump=None) -> list[subprocess.Popen]:
    """Start ddp_worker.py as `world` ranks (see `finish`). Independent launches may run side by side."""
    port = free_port()
    arg = json.dumps({"tree": tree, "out": str(out), "resume": str(resume) if resume else None,
                      "dump": str(dump) if dump else None})
    return [subprocess.Popen([sys.executable, WORKER, arg], env=rank_env(r, world, port), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in range(world)]


def finish(procs: list[subprocess.Popen], timeout: int = 180) -> list[str]:
    """Wait for the processes; every one must exit 0. Returns their stdout."""
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    return [o.strip() for o, _ in outs]


def launch(world: int, tree: dict, out: Path, *, resume=None, dump=None, timeout: int = 180) -> list[str]:
    """Run ddp_worker.py as `world` ranks; every rank must exit 0. Returns their stdout."""
    return finish(start(world, tree, out, resume=resume, dump=dump), timeout)


def with_train(tree: dict, **train) -> dict:
    return {**tree, "train": {**tree["train"], **train}}


def typed(tree: dict) -> list[str]:
    """The `imagegen train` arguments of a config tree as a user types them: --data, --model and a --set
    for every other key."""
    sets = [f"{section}.{k}={v}" for section in ("model", "data", "train") for k, v in tree[section].items()
            if (section, k) != ("data", "source")]
    return ["--data", tree["data"]["source"], "--model", tree["family"], *[x for kv in sets for x in ("--set", kv)]]


def test_gradients_of_two_ranks_at_half_batch_match_one_process(tmp_path):
    tree = {"family": "lin", "data": {"source": "shapes", "limit": 256},
            "train": {"batch_size": 16, "steps": 3, "log_every": 1, "sample_every": 0, "grid_size": 4,
                      "checkpoint_every": 10, "ema_decay": 0.0}}
    for world in (1, 2):
        (tmp_path / f"dump{world}").mkdir()
    launches = [start(world, tree, tmp_path / f"runs{world}", dump=tmp_path / f"dump{world}") for world in (1, 2)]
    for procs in launches:
        finish(procs)
    one, two = load_file(str(tmp_path / "dump1" / "rank0.safetensors")), load_file(str(tmp_path / "dump2" / "rank0.safetensors"))
    assert one["last_grad"].abs().max() > 1e-3                       # a real gradient, not zeros
    assert torch.allclose(one["last_grad"], two["last_grad"], rtol=0, atol=1e-6)
    for k in ("conv.weight", "conv.bias"):
        assert torch.allclose(one[k], two[k], rtol=0, atol=1e-6), k


def test_a_dead_rank_makes_the_other_exit_non_zero_quickly(tmp_path):
    port = free_port()
    args = ["-m", "imagegen", "train", "--data", "shapes", "--model", "dcgan", "--steps", "100000",
            "--batch-size", "16", "--set", "model.width=8", "--set", "data.limit=256", "--set", "train.log_every=1",
            "--set", "train.sample_every=0", "--set", "train.checkpoint_every=100000", "--out", str(tmp_path), "--no-progress"]
    procs = [subprocess.Popen([sys.executable, *args], env=rank_env(r, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.time() + 120
        while not any(p.stat().st_size > 0 for p in tmp_path.glob("*/log.jsonl")):   # training has started
            assert time.time() < deadline and procs[0].poll() is None, "training did not start"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        _, err = procs[0].communicate(timeout=90)
        assert procs[0].returncode not in (0, None)
        assert time.time() - killed < 90
        assert "another rank has died" in err, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_two_ranks_stay_bit_identical_only_rank_0_writes_and_torchrun_resumes_exactly(tmp_path):
    """Three launches of 2 ranks on the tiny DCGAN: 6 steps straight and, side by side with it, 3 steps
    through `torchrun imagegen train` (the command a user types); then those 3 resumed to 6. Both ranks
    end with the same weights, rank 0 alone writes, and the resumed run ends where the straight one did,
    bit for bit."""
    dump = tmp_path / "dump"
    dump.mkdir()
    straight_procs = start(2, with_train(TINY_DCGAN, steps=6, checkpoint_every=3), tmp_path / "a", dump=dump)
    # The same config as a user types it, so the two cannot drift apart.
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "imagegen", "train", *typed(with_train(TINY_DCGAN, steps=3, checkpoint_every=3)),
                                 "--out", str(tmp_path / "b"), "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    outs = finish(straight_procs)
    finish([torchrun], timeout=300)
    assert outs[0] == outs[1]                                        # both ranks name the same run folder
    assert len(list((tmp_path / "a").iterdir())) == 1
    a, b = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    _assert_same_tensors(a, b, "rank 0 vs rank 1")                   # parameters and buffers, bit for bit
    straight = Path(outs[0])
    assert json.loads((straight / "config.json").read_text())["world_size"] == 2
    records = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))          # one log, written once per step
    # The weights rank 0 saved are the ones both ranks ended with.
    _assert_same_tensors(load_checkpoint(list_checkpoints(straight)[-1])["model"], a, "checkpoint vs rank 0")

    (half,) = (tmp_path / "b").iterdir()
    assert imagegen.load_run(half).step == 3
    resumed = Path(launch(2, with_train(TINY_DCGAN, steps=6, checkpoint_every=3), tmp_path / "b", resume=half)[0])
    assert resumed == half
    a, b = load_checkpoint(list_checkpoints(straight)[-1]), load_checkpoint(list_checkpoints(resumed)[-1])
    assert a["state"]["step"] == b["state"]["step"] == 6
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_tensors(a["ema"], b["ema"], "ema")
    _assert_same_optim(a["optimizers"], b["optimizers"])


# The elastic jobs below: 60 steps of the tiny DCGAN, a checkpoint every 20.
ELASTIC_TREE = with_train(TINY_DCGAN, steps=60, checkpoint_every=20)


def torchrun_job(out: Path, max_restarts: int) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node 2 --max-restarts N -m imagegen train ...` of ELASTIC_TREE,
    its config given as a user types it (--set for every key), with no --resume: the default under torchrun."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             f"--max-restarts={max_restarts}", "--monitor-interval=0.1",
                             "-m", "imagegen", "train", *typed(ELASTIC_TREE), "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def worker_pid(agent: int, local_rank: int, restart: int) -> int | None:
    """The pid of torchrun's worker `local_rank` in its `restart`-th attempt: a child of the agent process
    whose environment says so (the agent starts its workers as subprocesses)."""
    want = {f"LOCAL_RANK={local_rank}".encode(), f"TORCHELASTIC_RESTART_COUNT={restart}".encode()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == agent and want <= set((entry / "environ").read_bytes().split(b"\0")):
                return int(entry.name)
        except (OSError, IndexError, ValueError):    # gone meanwhile, or not ours to read
            continue
    return None


def logged_step(out: Path) -> int:
    """The last step rank 0 has logged in the one run folder under `out` (0 before there is one)."""
    steps = [json.loads(line)["step"] for log in out.glob("*/log.jsonl") for line in log.read_text().splitlines()
             if line.endswith("}")]
    return max(steps, default=0)


def kill_rank_1_at(jobs: dict[str, tuple[subprocess.Popen, Path, int, bool]]) -> dict[str, int]:
    """For each job (process, out, step, after_checkpoint): SIGKILL worker 1 of its first attempt once rank 0
    has logged `step` (and, if asked, written its first checkpoint). The jobs run side by side, so they are
    watched together. Returns the step each had logged when it was killed."""
    killed: dict[str, int] = {}
    deadline = time.time() + 180
    while len(killed) < len(jobs):
        assert time.time() < deadline, f"the jobs did not reach their steps: killed {killed}"
        for name, (job, out, step, after_checkpoint) in jobs.items():
            if name in killed:
                continue
            assert job.poll() is None, f"{name} ended before the kill: " + job.communicate()[1][-3000:]
            runs = list(out.glob("*/"))
            if logged_step(out) >= step and (not after_checkpoint or (runs and list_checkpoints(runs[0]))):
                pid = worker_pid(job.pid, 1, 0)
                assert pid is not None, "no worker 1 under the agent"
                os.kill(pid, signal.SIGKILL)
                killed[name] = logged_step(out)
        time.sleep(0.01)
    return killed


def test_a_job_whose_rank_dies_is_restarted_by_torchrun_and_ends_as_an_uninterrupted_one(tmp_path):
    """Three torchrun jobs of 2 ranks side by side: one uninterrupted; one whose rank 1 is killed at a
    random step after the first checkpoint (the restarted workers resume the run they were writing); one
    killed before any checkpoint (they start over in the same folder). Every job ends on its own with the
    same final weights, EMA and Adam moments, bit for bit, in one run folder whose log holds each step once."""
    rng = random.Random()
    jobs = {name: torchrun_job(tmp_path / name, max_restarts=0 if name == "straight" else 1)
            for name in ("straight", "late", "early")}
    try:
        killed = kill_rank_1_at({"late": (jobs["late"], tmp_path / "late", rng.randrange(21, 41), True),  # after step 20's checkpoint
                                 "early": (jobs["early"], tmp_path / "early", rng.randrange(2, 11), False)})
        assert killed["early"] < 19, killed     # a rank that lost its peer stops within a step: no checkpoint yet
        outs = {name: job.communicate(timeout=300) for name, job in jobs.items()}
    finally:
        for job in jobs.values():     # the agent and its workers, whatever happened
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    for name, (o, e) in outs.items():
        assert jobs[name].returncode == 0, (name, killed, e[-3000:])
    assert "resuming" in outs["late"][0] and "starting over" in outs["early"][0], (killed, outs["late"][0], outs["early"][0])
    (reference,) = (tmp_path / "straight").iterdir()
    want = load_checkpoint(list_checkpoints(reference)[-1])
    for name in ("late", "early"):
        (run,) = (tmp_path / name).iterdir()            # the restart wrote into the run it was writing
        got = load_checkpoint(list_checkpoints(run)[-1])
        assert got["state"]["step"] == 60, name
        _assert_same_tensors(want["model"], got["model"], f"{name} (killed at step {killed[name]}): model")
        _assert_same_tensors(want["ema"], got["ema"], f"{name}: ema")
        _assert_same_optim(want["optimizers"], got["optimizers"])
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, 61)), name
        assert json.loads((run / "config.json").read_text())["elastic_job"]


def test_precision_choices(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        autocast_dtype("fp16", cpu)
    assert autocast_dtype("fp16", cuda) == torch.float16
    with pytest.raises(ConfigError, match="precision"):
        imagegen.resolve_config(with_train(TINY_DCGAN, precision="fp8"))
    # bf16 autocast on the CPU trains, with finite losses, through the same loop.
    run = imagegen.train(imagegen.resolve_config(with_train(TINY_DCGAN, steps=3, precision="bf16")), out=tmp_path, progress=False)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[-1]["bad_steps"] == 0 and all(torch.isfinite(torch.tensor(r["loss_d"])) for r in records)
    # ... and so does issue 14's GPU configuration, flow with the DiT backbone (on the CPU here).
    dit = {"family": "flow", "model": {"backbone": "dit", "dit_size": "xxs", "patch": 4},
           "data": {"source": "shapes", "limit": 64}, "train": {**TINY_DCGAN["train"], "steps": 3, "precision": "bf16"}}
    run = imagegen.train(imagegen.resolve_config(dit), out=tmp_path / "dit", progress=False)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[-1]["bad_steps"] == 0 and all(math.isfinite(r["loss"]) for r in records)
    assert imagegen.generate(imagegen.load_run(run).model, [0, 1], steps=2).isfinite().all()


def test_global_batch_must_divide_over_ranks(tmp_path, monkeypatch):
    run = imagegen.train(imagegen.resolve_config(with_train(TINY_DCGAN, steps=1, batch_size=15)), out=tmp_path, progress=False)
    assert imagegen.load_run(run).step == 1                           # one process: any batch size
    # As rank 0 of 2 (the process group itself is exercised by the launches above): refused before any work.
    monkeypatch.setattr(distributed, "setup", lambda device: distributed.Dist(rank=0, world=2, local_rank=0, owns_group=False))
    r = run_main("train", "--data", "shapes", "--model", "dcgan", "--steps", "1", "--batch-size", "15", "--out", tmp_path / "x")
    assert r.returncode == 2 and "must divide evenly over 2 processes" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_the_launcher_starts_torchrun_and_writes_one_run(tmp_path):
    """`imagegen train --nproc 2`: two processes (the command torchrun by hand would run), one run folder."""
    r = subprocess.run([sys.executable, "-m", "imagegen", "train", "--nproc", "2", "--data", "shapes", "--model", "dcgan",
                        "--steps", "3", "--batch-size", "8", "--set", "model.width=8", "--set", "model.z_dim=16",
                        "--set", "data.limit=64", "--set", "train.sample_every=0", "--out", str(tmp_path), "--no-progress"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "torch.distributed.run --nproc_per_node 2" in r.stdout and r.stdout.count("run folder:") == 1
    (run,) = tmp_path.iterdir()
    assert json.loads((run / "config.json").read_text())["world_size"] == 2 and imagegen.load_run(run).step == 3


@pytest.mark.parametrize("args, words", [
    (["--nproc", "2", "--batch-size", "15"], "must divide evenly over 2 processes"),
    (["--nproc", "2", "--nnodes", "2", "--batch-size", "16"], "needs --master"),
    (["--nproc", "2", "--nnodes", "2", "--batch-size", "16", "--master", "node0:29500"], "absolute path"),
    (["--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--batch-size", "16"], "ranks of 2 machines"),
    (["--nproc", "2", "--batch-size", "16", "--master", "node0:29500"], "for --nnodes > 1"),
])
def test_the_launchers_bad_input_is_one_line(tmp_path, args, words):
    r = run_main("train", "--data", "shapes", "--model", "dcgan", "--steps", "1", *args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_the_launcher_refuses_a_master_port_in_use(tmp_path):
    import socket
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        r = run_main("train", "--data", "shapes", "--model", "dcgan", "--steps", "1", "--nproc", "2", "--nnodes", "2",
                     "--batch-size", "16", "--master", f"127.0.0.1:{port}", "--out", str(tmp_path / "shared"))
    assert r.returncode == 2 and f"port {port} is in use" in r.stderr and not (tmp_path / "shared").exists()
