"""`imagegen train`, `demo`, `distill` and `models`: each command's flags beside its handler."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from ..checkpoint import read_config
from ..config import Range
from ..data import DataConfig, load_data
from ..distill import PAIRS, STUDENT_STEPS
from ..errors import ConfigError, DataError
from ..models import REGISTRY
from ..models.ddpm import STEPS as SAMPLE_STEPS
from ..report import write_report
from ..requests import TrainRequest
from ..train import resolve_config, train
from .options import TRAIN_RANGES, add_number


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a model into a new run folder, or --resume one")
    p.add_argument("--data", help="fashion-mnist, mnist, kmnist, cifar10, cifar100, idx:DIR, folder:PATH, zip:PATH (EDM "
                   "dataset.zip), store:DIR (imagegen data prepare), shapes, scenes (captioned); "
                   "for cyclegan pair:DIR or pair:SOURCE:CLASS_A,CLASS_B")
    p.add_argument("--model", help="model family (see `imagegen models`)")
    add_number(p, "--steps", TRAIN_RANGES["steps"], "total training steps")
    add_number(p, "--batch-size", TRAIN_RANGES["batch_size"], "images per step, over all processes")
    add_number(p, "--seed", TRAIN_RANGES["seed"], "the run seed (data order, initial weights, noise)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (bf16 on CUDA GPUs that have it, else fp32), fp32, bf16 (autocast), fp16 (CUDA, scaled)")
    p.add_argument("--logger", choices=["jsonl", "tensorboard"],
                   help="jsonl (default: log.jsonl) or tensorboard (event files in the run folder as well)")
    p.add_argument("--out", default="runs", help="folder that holds the run folders (default: runs)")
    p.add_argument("--config", help="TOML file of overrides ([model], [data], [train] tables)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. model.width=48")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", metavar="RUN_DIR|auto|never",
                   help="continue the run in RUN_DIR up to --steps; auto: continue the newest run in --out that holds "
                        "a checkpoint of this config, else start one (the default under torchrun, so that its "
                        "restarts continue the run); never: always a new run (the default otherwise)")
    p.add_argument("--strict", action="store_true", help="any bad data file is an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    launch = p.add_argument_group("several processes (this command starts torchrun for you)")
    add_number(launch, "--nproc", Range(1, 1024), "processes on this machine (one per GPU); --batch-size is global")
    add_number(launch, "--nnodes", Range(1, 1024), "machines in the job (default 1)", default=1)
    add_number(launch, "--node-rank", Range(0, 1023), "this machine's rank, 0 .. --nnodes - 1 (default 0)", default=0)
    launch.add_argument("--master", metavar="HOST:PORT", help="with --nnodes > 1: the address of node 0, the same on every node")
    add_number(launch, "--max-restarts", Range(0, 1000), "torchrun restarts of failed workers (default 0)", default=0)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("demo", help="the main job: train the DCGAN on Fashion-MNIST (or shapes) and write the report")
    add_number(p, "--steps", TRAIN_RANGES["steps"], "override the default number of steps")
    p.add_argument("--out", default="runs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("distill", help="a new run whose student samples a flow or ddpm run in 1, 2 or 4 steps")
    p.add_argument("run_dir", help="the teacher: a trained flow or ddpm run folder")
    add_number(p, "--steps", STUDENT_STEPS, "the student's sampling steps: 1, 2 or 4", default=1)
    p.add_argument("--out", default="runs", help="folder that holds the run folders (default: runs)")
    add_number(p, "--pairs", PAIRS, "teacher samples (noise, image) to learn from", default=20_000)
    add_number(p, "--teacher-steps", SAMPLE_STEPS, "the teacher's sampling steps for the couplings (default: its own)")
    add_number(p, "--train-steps", TRAIN_RANGES["steps"], "the student's training steps (default 4000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. model.method=reflow, model.adversarial=0.05, model.width=16")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this distilled run up to --train-steps")
    p.add_argument("--couplings-from", metavar="RUN_DIR",
                   help="reuse the couplings kept in another student of this teacher (no teacher time), "
                        "drawing only the missing ones when --pairs asks for more")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_distill)

    sub.add_parser("models", help="list the model families and their sampling options").set_defaults(handler=cmd_models)


def cmd_train(a) -> int:
    if a.resume and a.resume not in ("auto", "never"):
        changed = [f"--{k.replace('_', '-')}" for k in ("data", "model", "batch_size", "seed", "config")
                   if getattr(a, k) is not None] + (["--set"] if a.set else [])
        if changed:
            raise ConfigError(f"--resume continues a run with its own config; {', '.join(changed)} cannot change it")
        if a.steps is None:
            raise ConfigError("--resume needs --steps N (the step to train up to)")
        saved = read_config(a.resume)
        tree = {k: saved.get(k, {}) for k in ("family", "model", "data", "train")}
        tree["train"] = {**tree["train"], "steps": a.steps}
        for flag in ("device", "precision", "logger"):   # how to run, not what to train: may change on resume
            if getattr(a, flag):
                tree["train"][flag] = getattr(a, flag)
        if a.strict:
            tree["data"] = {**tree["data"], "strict": True}
        cfg = resolve_config(tree)
    else:   # flags given explicitly override the config file
        cfg = TrainRequest(model=a.model, data=a.data, config=a.config, flags={k: getattr(a, k) for k in TrainRequest.FLAGS},
                           sets=a.set, strict=a.strict).check()
    if a.dry_run:
        print(json.dumps(cfg.to_json(), indent=2))
        print("# model.image_size and model.channels are filled in from the data when training starts")
        return 0
    if a.nproc and "LOCAL_RANK" not in os.environ:   # the launcher; under torchrun this flag is already served
        return launch_torchrun(a, cfg.train.batch_size)
    run_dir = train(cfg, out=a.out, resume=a.resume, progress=not a.no_progress)   # None: train() picks auto or never
    if int(os.environ.get("RANK", "0")) == 0:   # under torchrun, rank 0 alone writes, as in training
        report = write_report(run_dir)
        print(f"run folder: {run_dir}\nreport:     {report}")
    return 0


def launch_torchrun(a, batch_size: int) -> int:
    """`imagegen train --nproc N ...` as `torchrun ... -m imagegen train ...`: the same code path as torchrun
    typed by hand, with the launcher's own flags checked first (one-line errors, nothing started)."""
    world = a.nproc * a.nnodes
    if batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} must divide evenly over {world} processes "
                          f"({a.nproc} per machine x {a.nnodes} machines)")
    if a.node_rank >= a.nnodes:
        raise ConfigError(f"--node-rank {a.node_rank}: the ranks of {a.nnodes} machines are 0 .. {a.nnodes - 1}")
    rdzv = ["--standalone"]
    if a.nnodes > 1:
        if not a.master:
            raise ConfigError("--nnodes > 1 needs --master HOST:PORT, the address of node 0 (the same on every node)")
        if a.out == "runs" or not Path(a.out).is_absolute():
            raise ConfigError("--nnodes > 1 needs --out as an absolute path to a folder every node shares "
                              "(rank 0 writes the run there; the other nodes read its checkpoints)")
        host, _, port = a.master.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--master {a.master!r}: give HOST:PORT, e.g. node0.cluster:29500")
        if a.node_rank == 0:
            check_port_free(int(port))
        rdzv = ["--nnodes", str(a.nnodes), "--node_rank", str(a.node_rank), "--master_addr", host, "--master_port", port]
    elif a.master:
        raise ConfigError("--master is for --nnodes > 1 (one machine needs no address: torchrun --standalone)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc),
           "--max_restarts", str(a.max_restarts), *rdzv, "-m", "imagegen", "train", *worker_argv(a)]
    print("launching: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.run(cmd).returncode


def check_port_free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError as e:
            raise ConfigError(f"--master port {port} is in use on this machine ({e.strerror}): choose another") from None


def worker_argv(a) -> list[str]:
    """The `imagegen train` arguments of the namespace, without the launcher's: what each process gets."""
    out: list[str] = []
    for flag in ("data", "model", "steps", "batch_size", "seed", "device", "precision", "logger", "out", "config", "resume"):
        value = getattr(a, flag)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    for kv in a.set:
        out += ["--set", kv]
    out += ["--strict"] * a.strict + ["--no-progress"] * a.no_progress
    return out


def cmd_distill(a) -> int:
    from ..distill import distill
    if a.resume and a.set:
        raise ConfigError("--resume continues a run with its own config; --set cannot change it")
    run_dir = distill(a.run_dir, steps=a.steps, out=a.out, pairs=a.pairs, teacher_steps=a.teacher_steps,
                      overrides=a.set, resume=a.resume, train_steps=a.train_steps, progress=not a.no_progress,
                      couplings_from=a.couplings_from)
    report = write_report(run_dir)
    print(f"run folder: {run_dir}\nreport:     {report}")
    return 0


def cmd_demo(a) -> int:
    source = "fashion-mnist"
    try:
        load_data(DataConfig(source=source))
    except DataError as e:
        print(f"Fashion-MNIST is neither installed nor downloadable ({e}).\n"
              "Training on the built-in `shapes` dataset instead.", file=sys.stderr)
        source = "shapes"
    overrides = {"family": "dcgan", "data": {"source": source}}
    if a.steps:
        overrides["train"] = {"steps": a.steps}
    run_dir = train(resolve_config(overrides), out=a.out, progress=not a.no_progress)
    report = write_report(run_dir)
    print(f"run folder: {run_dir}\nreport:     {report}\nsample grid: {sorted((run_dir / 'samples').glob('*.png'))[-1]}")
    return 0


def cmd_models(a) -> int:
    for name, cls in REGISTRY.items():
        opts = " ".join(f"--{k}" for k in cls.sample_options)
        needs = ("needs labels" if cls.needs_labels else "needs pair:" if cls.translates
                 else "needs a teacher" if cls.made_by else "")
        opts = ("(imagegen translate)" if cls.translates else f"(imagegen {cls.made_by})" if cls.made_by else
                "(model.autoencoder of flow, ddpm)" if cls.autoencodes else opts)
        print(f"{name:11s} {(cls.__module__.rsplit('.', 1)[-1]) + '.py':15s} {needs:16s}{opts}")
        print(f"{'':11s} {cls.summary}")
    return 0
