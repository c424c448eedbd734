"""The `imagegen` command: argparse subcommands, each a few lines over the public API.

Every error imagegen raises on purpose (a typed ImagegenError) is printed as one line naming the file,
field or value, with exit status 2; a traceback means a bug. Every number an option takes has a
documented range (shown in --help), checked while the arguments are parsed, before anything is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .version import __version__
from .checkpoint import load_run, read_config
from .config import Range, apply_overrides, field_ranges, load_toml
from .data import DataConfig, describe, expand_path, load_data
from .engine import ENGINES, use_engine
from .errors import ConfigError, DataError, ImagegenError
from .report import write_report
from .models import REGISTRY
from .evaluate.evaluator import EvaluatorConfig
from .evaluate.run_eval import N_IMAGES, N_PROMPTS
from .evaluate.analyse import KEEP
from .evaluate.likelihood import N_LIKELIHOOD
from .evaluate.synth import PER_CLASS
from .models.ddpm import RESAMPLE, STEPS as SAMPLE_STEPS, STRENGTH
from .sample import (BATCH_SIZE, FRAMES, PAD, SEED, SIDES, check_options, extend_image, generate, grid, interpolate, interpolate_images,
                     outpaint_canvas, parse_floats, parse_seeds, resolve_labels, read_image, read_images, read_mask, save_images,
                     save_named, to_pil, to_uint8)
from .train import TrainConfig, resolve_config, train
from .vary import MIX, breed
from .directions import direction_shift


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like the library's typed errors (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def number(rng: Range):
    """An argparse type that parses a number and checks it against its documented range."""
    def parse(text: str):
        try:
            return rng.parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = rng.kind.__name__
    parse.range = rng        # for --help and the tests that sweep every numeric option
    return parse


def add_number(p, flag: str, rng: Range, help: str = "", **kw) -> None:
    """An option that takes a number in `rng`; --help shows the range."""
    p.add_argument(flag, type=number(rng), help=f"{help}{'; ' if help else ''}range {rng}", **kw)


TRAIN_RANGES = field_ranges(TrainConfig)

# Flags of `train` that map onto config keys; given explicitly, they override the config file.
TRAIN_FLAGS = {"data": "data.source", "steps": "train.steps", "batch_size": "train.batch_size",
               "seed": "train.seed", "device": "train.device", "precision": "train.precision",
               "logger": "train.logger"}


def _add_train(sub) -> None:
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
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run up to --steps")
    p.add_argument("--strict", action="store_true", help="any bad data file is an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_train(a) -> int:
    if a.resume:
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
    else:
        tree = load_toml(a.config) if a.config else {}
        if a.model:
            tree["family"] = a.model
        flags = [f"{key}={json.dumps(getattr(a, name))}" for name, key in TRAIN_FLAGS.items() if getattr(a, name) is not None]
        apply_overrides(tree, flags + (["data.strict=true"] if a.strict else []) + a.set)
        cfg = resolve_config(tree)
    if a.dry_run:
        print(json.dumps(cfg.to_json(), indent=2))
        print("# model.image_size and model.channels are filled in from the data when training starts")
        return 0
    run_dir = train(cfg, out=a.out, resume=a.resume, progress=not a.no_progress)
    report = write_report(run_dir)
    print(f"run folder: {run_dir}\nreport:     {report}")
    return 0


def cmd_distill(a) -> int:
    from .distill import distill
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


# Sampling options of every family (`--steps`, `--guidance`, `--truncation`...), offered by `sample`,
# `inpaint` and `outpaint`; a run accepts only its own family's.
SAMPLE_OPTIONS: dict[str, tuple[type, str]] = {}
for _cls in REGISTRY.values():
    SAMPLE_OPTIONS.update(_cls.sample_options)


def _add_sample_options(p, only: tuple[str, ...] | None = None) -> None:
    for name, (tp, help_text) in SAMPLE_OPTIONS.items():
        if only is None or name in only:
            if isinstance(tp, Range):
                add_number(p, f"--{name}", tp, help_text)
            else:
                p.add_argument(f"--{name}", type=tp, help=help_text)


def _add_engine(p) -> None:
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="what runs the network: torch (default) or onnxruntime, one graph, whose single images cost "
                        "little more than their share of a batch (exported on first use, seconds; needs "
                        "imagegen[export]; pixels may differ from torch's by one level)")


def _sample_opts(a, model) -> dict:
    return check_options(model, {k: getattr(a, k) for k in SAMPLE_OPTIONS if getattr(a, k, None) is not None})


def _labels(a, run, seeds: list[int]):
    return resolve_labels(run.model, run.classes, a.labels, seeds)


def cmd_sample(a) -> int:
    seeds = parse_seeds(a.seeds)
    run = load_run(a.run_dir, weights=a.weights)
    use_engine(run.model, a.engine)
    labels = _labels(a, run, seeds)
    latent = parse_floats(a.latent) if a.latent else None
    if a.directions:
        if latent:
            raise ConfigError("give --latent or --directions, not both")
        latent = direction_shift(run.model, parse_floats(a.directions, "--directions"))
    images = generate(run.model, seeds, labels=labels, batch_size=a.batch_size, latent=latent, prompts=_prompts(a),
                      negative_prompt=a.negative_prompt, **_sample_opts(a, run.model))
    paths = save_images(images, a.out, seeds)
    if a.grid:
        grid(images).save(a.grid)
    print(f"wrote {len(paths)} images to {a.out}" + (f" and a grid to {a.grid}" if a.grid else ""))
    return 0


def _prompts(a) -> str | list[str] | None:
    """--prompt (one for every seed) or --prompts FILE (one per line, one per seed), not both."""
    if a.prompt is not None and a.prompts:
        raise ConfigError("give --prompt or --prompts FILE, not both")
    if not a.prompts:
        return a.prompt
    try:
        lines = Path(a.prompts).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--prompts {a.prompts}: cannot read it ({e})") from None
    return [line.strip() for line in lines if line.strip()]


def cmd_interpolate(a) -> int:
    run = load_run(a.run_dir)
    if a.images:
        paths = a.images.split(",")
        if len(paths) != 2 or a.seeds:
            raise ConfigError("--images needs exactly two image files like a.png,b.png (and no --seeds)")
        a_img, b_img = (read_image(p, run.model.cfg.channels) for p in paths)
        size = run.model.cfg.image_size
        for p, img in zip(paths, (a_img, b_img)):
            if img.shape[-2:] != (size, size):
                raise ConfigError(f"{p}: image is {img.shape[-1]}x{img.shape[-2]}, the model's size is {size}x{size}")
        labels = _labels(a, run, [0])
        images = interpolate_images(run.model, a_img, b_img, a.frames, labels)
    else:
        seeds = parse_seeds(a.seeds or "")
        if len(seeds) != 2:
            raise ConfigError(f"--seeds needs exactly two seeds like 3,9, got {a.seeds!r}")
        labels = _labels(a, run, seeds[:1])
        images = interpolate(run.model, seeds[0], seeds[1], a.frames, labels)
    grid(images, nrow=a.frames).save(a.out)
    print(f"wrote a {a.frames}-frame strip to {a.out}")
    return 0


def _source(a, run, text: str | None, what: str) -> list:
    """Seeds ('3' or '3,9') or image files ('a.png' or 'a.png,b.png') as vary/breed sources."""
    if a.image_files:
        paths = [p for p in a.image_files.split(",") if p.strip()]
        size = run.model.cfg.image_size
        images = []
        for p in paths:
            img = read_image(p, run.model.cfg.channels)
            if img.shape[-2:] != (size, size):
                raise ConfigError(f"{p}: image is {img.shape[-1]}x{img.shape[-2]}, the model's size is {size}x{size}")
            images.append(img)
        return images
    if text is None:
        raise ConfigError(f"give {what} or --image(s)")
    return parse_seeds(text)


def cmd_vary(a) -> int:
    run = load_run(a.run_dir)
    breeding = a.command == "breed"
    sources = _source(a, run, a.parents if breeding else (None if a.seed is None else str(a.seed)),
                      "--parents A,B" if breeding else "--seed S")
    want = 2 if breeding else 1
    if len(sources) != want:
        raise ConfigError(f"{'breed takes two parents' if breeding else 'vary takes one source'}, got {len(sources)}")
    seeds = parse_seeds(a.seeds)
    labels = _labels(a, run, [s for s in sources if isinstance(s, int)][:1] or [0]) if a.labels else None
    images = breed(run.model, sources, seeds, strength=a.strength, mix=a.mix if breeding else 0.5, labels=labels,
                   prompt=a.prompt, negative_prompt=a.negative_prompt, batch_size=a.batch_size,
                   **_sample_opts(a, run.model))
    paths = save_images(images, a.out, seeds)
    if a.grid:
        grid(images).save(a.grid)
    print(f"wrote {len(paths)} images to {a.out}" + (f" and a grid to {a.grid}" if a.grid else ""))
    return 0


def _extend(a, make_canvas) -> int:
    run = load_run(a.run_dir)
    image = read_image(a.image, run.model.cfg.channels)
    image, mask = make_canvas(image)
    labels = _labels(a, run, [a.seed])
    out = extend_image(run.model, image, mask, a.seed, labels, **_sample_opts(a, run.model),
                       **({"resample": a.resample} if a.resample is not None else {}))
    to_pil(to_uint8(out)[0]).save(a.out)
    print(f"wrote {a.out} ({out.shape[-1]}x{out.shape[-2]})")
    return 0


def cmd_inpaint(a) -> int:
    return _extend(a, lambda img: (img, read_mask(a.mask, img.shape[-2], img.shape[-1])))


def cmd_outpaint(a) -> int:
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    return _extend(a, lambda img: outpaint_canvas(img, a.pad, sides))


def cmd_translate(a) -> int:
    run = load_run(a.run_dir)
    if not run.model.translates:
        raise ConfigError(f"{a.run_dir} is a {run.family} model, which draws images from seeds: use `imagegen sample`")
    use_engine(run.model, a.engine)
    cfg = run.model.cfg
    names, images, skipped, converted = read_images(a.input, cfg.image_size, cfg.channels)
    for f, reason in skipped:
        print(f"skipped {f}: {reason}", file=sys.stderr)
    if converted:
        print(f"note: {len(converted)} image(s) converted to {cfg.channels} channel(s), e.g. {converted[0]}", file=sys.stderr)
    translated, reconstructed = run.model.cycle(images, a.direction)
    save_named(translated, a.out, names)
    if a.grid:
        k = min(len(names), a.grid_images)
        grid(torch.cat([images[:k], translated[:k].cpu(), reconstructed[:k].cpu()]), nrow=k,
             scale=2 if cfg.image_size < 48 else 1).save(a.grid)
    src, dst = (cfg.domain_a, cfg.domain_b) if a.direction == "a2b" else (cfg.domain_b, cfg.domain_a)
    print(f"translated {len(names)} image(s) {src} -> {dst} into {a.out}"
          + (f"; grid (input / translated / reconstructed) in {a.grid}" if a.grid else ""))
    return 0


def _print_metrics(metrics: dict) -> None:
    width = max(map(len, metrics))
    for k, v in metrics.items():
        print(f"{k:{width}s}  {v:.4g}" if isinstance(v, float) else f"{k:{width}s}  {json.dumps(v)}")


def cmd_evaluate(a) -> int:
    if a.anchors:
        from .evaluate.anchors import evaluate_anchors
        if a.run_dir or not a.data:
            raise ConfigError("--anchors takes --data DATA and no run folder")
        out = evaluate_anchors(a.data, n=a.n, out_dir=a.out)
        for name, m in out["anchors"].items():
            print(f"== anchor {name}")
            _print_metrics(m)
        print(f"# written to {out['path']}")
        return 0
    if not a.run_dir:
        raise ConfigError("evaluate needs a run folder (or --anchors --data DATA)")
    from .evaluate.run_eval import evaluate_run
    out = evaluate_run(a.run_dir, n=a.n, data=a.data, likelihood=a.likelihood or 0, prompts=a.prompts or 0)
    if a.tstr:
        from .checkpoint import write_json_atomic
        from .evaluate.synth import train_on_synthetic
        out["metrics"]["tstr"] = train_on_synthetic(a.run_dir, per_class=a.per_class)
        write_json_atomic(Path(a.run_dir) / "metrics.json", out)
    write_report(a.run_dir)
    _print_metrics(out["metrics"])
    p = out["protocol"]
    if "translated" in p:
        print(f"# translated {p['translated']} test images of {', '.join(p['domains'])}, judged by {p['evaluator']}; "
              f"written to {a.run_dir}/metrics.json")
        return 0
    print(f"# {p['generated']} generated (seeds {p['seeds']}) vs {p['real']} real ({p['data']} {p['real_split']}), "
          f"evaluator {p['evaluator']}; written to {a.run_dir}/metrics.json")
    if "likelihood" in p:
        from .evaluate.likelihood import PUBLISHED
        print(f"# bits/dim on {p['likelihood']['images']} test images, {p['likelihood']['dequantization']}")
        for name, value in PUBLISHED.get(p["data"], {}).items():
            print(f"#   published, {name}: {value}")
    return 0


def cmd_leaderboard(a) -> int:
    from .evaluate.anchors import collect, leaderboard
    markdown, page = leaderboard(collect(a.paths))
    print(markdown)
    if a.html:
        Path(a.html).write_text(page)
        print(f"# HTML written to {a.html}")
    return 0


def cmd_analyse(a) -> int:
    from .evaluate.analyse import analyse_folder, analyse_run
    if a.images:
        if a.keep is not None:
            raise ConfigError("--keep filters generated samples; it does not go with --images")
        out = analyse_folder(a.run_dir, a.images, a.out, reference=a.reference)
        for r in sorted(out.pop("scores"), key=lambda r: r["bits_per_dim"]):
            print(f"{r['bits_per_dim']:8.4f} bits/dim  {r['test_share_below']:6.1%} of test images more likely  {r['file']}")
        ref = out["test_reference"]
        print(f"# test images: {ref['mean']:.4f} bits/dim on average over {ref['images']}; gallery: {Path(a.out) / 'gallery.html'}")
        return 0
    out = analyse_run(a.run_dir, a.out, n=a.n, keep=a.keep, likelihood=a.likelihood)
    print(json.dumps({k: v for k, v in out.items() if k != "run"}, indent=2))
    print(f"# gallery: {Path(a.out) / 'gallery.html'}" + (f"; kept images in {Path(a.out) / 'kept'}" if a.keep else ""))
    return 0


def cmd_synth(a) -> int:
    from .evaluate.synth import synthetic_dataset, write_dataset
    ds = synthetic_dataset(a.run_dir, a.per_class)
    out = write_dataset(ds, a.out, a.format)
    how = f"idx:{out}" if a.format == "idx" else f"folder:{out} --set data.size={ds.size}"
    print(f"wrote {len(ds)} images in {len(ds.classes)} classes to {out}; read back with --data {how}")
    return 0


def cmd_evaluator(a) -> int:
    if a.data == "scenes":   # no classes: its evaluator is the GenEval-style judge of the nine cells
        from .evaluate.geneval import JudgeConfig, train_judge
        judge = train_judge(JudgeConfig(epochs=a.epochs or JudgeConfig.epochs))
        scores = judge.info["test_geneval"]
        print(f"judge {judge.name}: {judge.info['test_cell_accuracy']:.4f} of test cells right, "
              f"{judge.info['test_image_accuracy']:.4f} of test images with all nine right, GenEval-style score of "
              f"the real test images {scores['overall']:.4f} ({judge.info['train_seconds']} s of training)")
        return 0
    from .evaluate.evaluator import EvaluatorConfig, train_evaluator
    ev = train_evaluator(EvaluatorConfig(data=a.data, epochs=a.epochs or EvaluatorConfig.epochs))
    print(f"evaluator {ev.name}: test accuracy {ev.info['test_accuracy']:.4f} on {ev.info['test_images']} images "
          f"({ev.info['train_seconds']} s of training)")
    return 0


def cmd_data(a) -> int:
    if a.data_command == "prepare":
        from .data.prepare import prepare
        prepare(a.data, a.out, size=a.size or 0, channels=int(a.channels or 0), strict=a.strict,
                progress=not a.no_progress)
        return 0
    ds = load_data(DataConfig(source=a.data, split=a.split, strict=a.strict))
    print(describe(ds))
    return 0


def cmd_report(a) -> int:
    print(write_report(a.run_dir))
    return 0


def cmd_export(a) -> int:
    from .export import export_onnx
    run = load_run(a.run_dir, weights=a.weights)
    done = export_onnx(run, a.out, direction=a.direction)
    print(f"wrote {done.path} ({done.path.stat().st_size / 2**20:.1f} MiB): the {run.family} network of {run.path}")
    for kind, table in (("input", done.inputs), ("output", done.outputs)):
        for name, (dtype, shape) in table.items():
            print(f"  {kind:6s} {name:12s} {dtype:16s} {' x '.join(map(str, shape))}")
    print(f"  usage: {done.usage}")
    print(f"checked: onnxruntime matches torch within {done.max_abs_diff:.2g} (tolerance 1e-4) on random inputs")
    return 0


def cmd_serve(a) -> int:
    from .serve import serve
    serve(a.runs_dir, host=a.host, port=a.port, threads=a.threads, token=a.token, no_token=a.no_token, engine=a.engine)
    return 0


def cmd_models(a) -> int:
    for name, cls in REGISTRY.items():
        opts = " ".join(f"--{k}" for k in cls.sample_options)
        needs = ("needs labels" if cls.needs_labels else "needs pair:" if cls.translates
                 else "needs a teacher" if cls.made_by else "")
        opts = "(imagegen translate)" if cls.translates else f"(imagegen {cls.made_by})" if cls.made_by else opts
        print(f"{name:9s} {(cls.__module__.rsplit('.', 1)[-1]) + '.py':13s} {needs:16s}{opts}")
    return 0


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
    _add_train(sub)

    p = sub.add_parser("demo", help="the main job: train the DCGAN on Fashion-MNIST (or shapes) and write the report")
    add_number(p, "--steps", TRAIN_RANGES["steps"], "override the default number of steps")
    p.add_argument("--out", default="runs")
    p.add_argument("--no-progress", action="store_true")

    from .distill import PAIRS, STUDENT_STEPS
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

    p = sub.add_parser("sample", help="one PNG per seed from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--seeds", default="0-63", help="e.g. 0-63 or 3,9,12-14")
    p.add_argument("--out", required=True, help="folder for seedNNNNNN.png files")
    p.add_argument("--grid", help="also write all images as one grid PNG")
    add_number(p, "--batch-size", BATCH_SIZE, "images per forward pass (speed only; pixels do not change)", default=64)
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--labels", help=LABELS_HELP)
    p.add_argument("--latent", help="shift the first latent dimensions of every seed, e.g. 0.5,-1 (GANs, VAEs)")
    p.add_argument("--directions", help="move every seed's latent along the model's principal directions "
                   "(GANSpace), e.g. 1.5,0,-2 (GANs, VAEs; each in [-5, 5])")
    p.add_argument("--prompt", help="what to draw, for a model trained on captions, e.g. 'a red star left of a blue circle'")
    p.add_argument("--prompts", metavar="FILE", help="a text file with one prompt per seed, one per line")
    p.add_argument("--negative-prompt", help="what to steer away from (replaces guidance's unconditional branch)")
    _add_engine(p)
    _add_sample_options(p)

    p = sub.add_parser("interpolate", help="a strip of images through latent space between two seeds (or two images, VAEs)")
    p.add_argument("run_dir")
    p.add_argument("--seeds", help="two seeds, e.g. 3,9")
    p.add_argument("--images", help="two image files, e.g. a.png,b.png (families with an encoder: vae, cvae)")
    p.add_argument("--labels", help="the class of every frame (conditional families)")
    add_number(p, "--frames", FRAMES, "images in the strip, both ends included", default=8)
    p.add_argument("--out", required=True, help="PNG file")

    for name, what in (("vary", "variations of one image, a seed's or a file's: latent steps (GANs, VAEs), SDEdit (ddpm, flow)"),
                       ("breed", "variations of the blend of two parents (seeds or image files)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("run_dir")
        if name == "vary":
            add_number(p, "--seed", SEED, "the seed whose image to vary")
            p.add_argument("--image", dest="image_files", help="or an image file to vary (a sketch, say)")
        else:
            p.add_argument("--parents", help="two seeds, e.g. 3,9")
            p.add_argument("--images", dest="image_files", help="or two image files, e.g. a.png,b.png")
            add_number(p, "--mix", MIX, "how far from the first parent to the second (default 0.5)", default=0.5)
        add_number(p, "--strength", STRENGTH, "how far from the source: small = close, 1 = a new image (default 0.5)",
                   default=0.5)
        p.add_argument("--seeds", default="0-15", help="one variation per seed, e.g. 0-15")
        p.add_argument("--out", required=True, help="folder for seedNNNNNN.png files")
        p.add_argument("--grid", help="also write all images as one grid PNG")
        add_number(p, "--batch-size", BATCH_SIZE, "images per forward pass (speed only; pixels do not change)", default=64)
        p.add_argument("--labels", help="the class of every variation (conditional families)")
        p.add_argument("--prompt", help="the prompt of every variation (text models)")
        p.add_argument("--negative-prompt", help="what to steer away from (text models)")
        _add_sample_options(p)

    for name, what in (("inpaint", "fill the white pixels of --mask in --image (diffusion, VAE)"),
                       ("outpaint", "extend --image by --pad pixels on the chosen --sides (diffusion)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("run_dir")
        p.add_argument("--image", required=True, help="PNG/JPEG/WebP input (converted to the model's channels)")
        if name == "inpaint":
            p.add_argument("--mask", required=True, help="same size as --image: white = generate, black = keep")
        else:
            add_number(p, "--pad", PAD, "pixels to add on each chosen side", default=8)
            p.add_argument("--sides", default=",".join(SIDES), help="comma list of left, right, top, bottom")
        p.add_argument("--out", required=True, help="PNG file")
        add_number(p, "--seed", SEED, "the seed of the generated pixels", default=0)
        p.add_argument("--labels", help="the class to generate (conditional models)")
        add_number(p, "--resample", RESAMPLE, "RePaint resampling passes per step (default 5)")
        _add_sample_options(p, only=("steps", "guidance"))

    p = sub.add_parser("translate", help="translate images to the other domain with a cyclegan run")
    p.add_argument("run_dir")
    p.add_argument("--direction", default="a2b", choices=["a2b", "b2a"], help="a2b (default) or b2a")
    p.add_argument("--input", required=True, help="one image, or a folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="folder for the translated images (same file names)")
    p.add_argument("--grid", help="also write a PNG with rows input / translated / reconstructed")
    add_number(p, "--grid-images", Range(1, 256), "images in the --grid (default 16)", default=16)
    _add_engine(p)

    p = sub.add_parser("data", help="inspect a data source (info), or decode one into a store (prepare)")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("info", help="counts, shape, classes and where the files came from")
    q.add_argument("data")
    q.add_argument("--split", default="train", choices=["train", "test"])
    q.add_argument("--strict", action="store_true", help="any bad file is an error")
    q = dsub.add_parser("prepare", help="decode a source once into a memory-mapped store (then --data store:DIR)")
    q.add_argument("data", help="any --data source but pair: (folder:PATH, zip:PATH, fashion-mnist, cifar10...)")
    q.add_argument("--out", required=True, help="the store's folder (must not exist)")
    add_number(q, "--size", field_ranges(DataConfig)["size"], "image side in pixels (default: the source's own; 64 for folders)")
    q.add_argument("--channels", choices=["1", "3"], help="1 or 3 (default: the source's own)")
    q.add_argument("--strict", action="store_true", help="any bad file is an error")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate", help="metrics.json for a run: FD, KID, precision/recall... in the evaluator's features")
    p.add_argument("run_dir", nargs="?")
    add_number(p, "--n", N_IMAGES, "images to generate (seeds 0..n-1)", default=10_000)
    p.add_argument("--data", help="dataset whose test split and evaluator to use (default: the run's)")
    p.add_argument("--anchors", action="store_true", help="measure the anchors (floor, shift, grain, blur, noise, random) of --data")
    p.add_argument("--out", default="runs", help="with --anchors: folder for anchors-<data>.json")
    p.add_argument("--tstr", action="store_true", help="also train-on-synthetic, test-on-real (conditional runs)")
    add_number(p, "--per-class", PER_CLASS, "with --tstr: synthetic images per class", default=1000)
    add_number(p, "--likelihood", N_LIKELIHOOD, "also bits/dim of the first N test images (flow, vae, cvae)")
    add_number(p, "--prompts", N_PROMPTS, "a text run on scenes: GenEval-style scores on the first N test captions "
               "(default: all 2,000)")

    p = sub.add_parser("leaderboard", help="a table of evaluated runs and anchors (Markdown; --html FILE too)")
    p.add_argument("paths", nargs="+", help="run folders, folders of runs, or anchors-*.json files")
    p.add_argument("--html")

    p = sub.add_parser("analyse", help="score every sample, write a ranked gallery, optionally keep the best")
    p.add_argument("run_dir")
    add_number(p, "--n", N_IMAGES, "images to score (seeds 0..n-1)", default=2000)
    p.add_argument("--out", required=True, help="folder for analysis.json, gallery.html (and kept/)")
    add_number(p, "--keep", KEEP, "share of samples to keep, by realism score, e.g. 0.5")
    p.add_argument("--likelihood", action="store_true", help="also score each sample's bits/dim (flow, vae, cvae)")
    p.add_argument("--images", metavar="FOLDER", help="score your own images instead: each one's bits/dim under the model")
    add_number(p, "--reference", N_LIKELIHOOD, "with --images: real test images to place the scores among", default=200)

    p = sub.add_parser("synth", help="a labelled synthetic dataset from a conditional run")
    p.add_argument("run_dir")
    add_number(p, "--per-class", PER_CLASS, "images of every class", default=1000)
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="folder", choices=["folder", "idx"])

    p = sub.add_parser("evaluator", help="the per-dataset classifier whose features the metrics use")
    esub = p.add_subparsers(dest="evaluator_command", required=True)
    q = esub.add_parser("train", help="train (deterministically) and cache the evaluator of a dataset")
    q.add_argument("--data", required=True)
    add_number(q, "--epochs", field_ranges(EvaluatorConfig)["epochs"],
               "passes over the training split (default 2; 3 for the scenes judge)")

    p = sub.add_parser("report", help="rebuild a run's report.html")
    p.add_argument("run_dir")

    p = sub.add_parser("export", help="the run's sampling network as an ONNX file, checked in onnxruntime")
    p.add_argument("run_dir")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="onnx (the only format so far)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="ema (default) or the raw model weights")
    p.add_argument("--direction", default="a2b", choices=["a2b", "b2a"], help="cyclegan: which generator (default a2b)")

    p = sub.add_parser("serve", help="the web page and HTTP API over every run folder under RUNS_DIR")
    p.add_argument("runs_dir")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    add_number(p, "--port", Range(1, 65535), "TCP port", default=8000)
    add_number(p, "--threads", Range(1, 1024, zero="all cores but one"), "torch threads for the models", default=0)
    p.add_argument("--token", help="the token that uploads and training need (default: a new one, printed at start)")
    p.add_argument("--no-token", action="store_true", help="no token (allowed with a loopback --host only)")
    _add_engine(p)

    sub.add_parser("models", help="list the model families and their sampling options")
    parser.epilog = (_grouped_commands(sub) + "\n\nDocs: the docs/ folder of the source, or the site it builds "
                     "(make docs-serve); start with docs/quickstart.md.")
    for name, p in sub.choices.items():
        for q in [p, *(c for a in p._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values())]:
            q.epilog = f"Docs: docs/{DOCS_PAGES[name]}"
    return parser


LABELS_HELP = ("class name or index for every seed, or a comma list with one per seed "
               "(see `imagegen data info`); default: seed mod number of classes")

COMMANDS = {"train": cmd_train, "distill": cmd_distill, "demo": cmd_demo, "sample": cmd_sample, "interpolate": cmd_interpolate,
            "vary": cmd_vary, "breed": cmd_vary,
            "inpaint": cmd_inpaint, "outpaint": cmd_outpaint, "translate": cmd_translate, "evaluate": cmd_evaluate, "evaluator": cmd_evaluator,
            "leaderboard": cmd_leaderboard, "analyse": cmd_analyse, "synth": cmd_synth,
            "data": cmd_data, "report": cmd_report, "export": cmd_export, "models": cmd_models, "serve": cmd_serve}


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
        return COMMANDS[args.command](args)
    except ImagegenError as e:
        print(f"imagegen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imagegen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
