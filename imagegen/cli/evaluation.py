"""`imagegen evaluate`, `evaluator`, `leaderboard`, `analyse`, `synth` and `report`: each command's
flags beside its handler."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import field_ranges
from ..data.registry import HELD_OUT
from ..errors import ConfigError
from ..evaluate.analyse import KEEP
from ..evaluate.evaluator import EvaluatorConfig
from ..evaluate.likelihood import N_LIKELIHOOD
from ..evaluate.run_eval import N_IMAGES, N_PROMPTS
from ..evaluate.synth import PER_CLASS
from ..report import write_report
from .options import add_number


def add_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics.json for a run: FD, KID, precision/recall... in the evaluator's features")
    p.add_argument("run_dir", nargs="?")
    add_number(p, "--n", N_IMAGES, "images to generate (seeds 0..n-1)", default=10_000)
    p.add_argument("--data", help="dataset whose test split and evaluator to use (default: the run's)")
    p.add_argument("--anchors", action="store_true", help="measure the anchors (floor, shift, grain, blur, noise, random) of --data")
    p.add_argument("--out", default="runs", help="with --anchors: folder for anchors-<data>.json")
    add_number(p, "--held-out", HELD_OUT, "with --anchors: the test split is this share of a folder or zip, as "
               "its runs' data.held_out", default=0.0)
    p.add_argument("--tstr", action="store_true", help="also train-on-synthetic, test-on-real (conditional runs)")
    add_number(p, "--per-class", PER_CLASS, "with --tstr: synthetic images per class", default=1000)
    add_number(p, "--likelihood", N_LIKELIHOOD, "also bits/dim of the first N test images (flow, vae, cvae)")
    add_number(p, "--prompts", N_PROMPTS, "a text run on scenes: GenEval-style scores on the first N test captions "
               "(default: all 2,000)")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("leaderboard", help="a table of evaluated runs and anchors (Markdown; --html FILE too)")
    p.add_argument("paths", nargs="+", help="run folders, folders of runs, or anchors-*.json files")
    p.add_argument("--html")
    p.set_defaults(handler=cmd_leaderboard)

    p = sub.add_parser("analyse", help="score every sample, write a ranked gallery, optionally keep the best")
    p.add_argument("run_dir")
    add_number(p, "--n", N_IMAGES, "images to score (seeds 0..n-1)", default=2000)
    p.add_argument("--out", required=True, help="folder for analysis.json, gallery.html (and kept/)")
    add_number(p, "--keep", KEEP, "share of samples to keep, by realism score, e.g. 0.5")
    p.add_argument("--likelihood", action="store_true", help="also score each sample's bits/dim (flow, vae, cvae)")
    p.add_argument("--images", metavar="FOLDER", help="score your own images instead: each one's bits/dim under the model")
    add_number(p, "--reference", N_LIKELIHOOD, "with --images: real test images to place the scores among", default=200)
    p.set_defaults(handler=cmd_analyse)

    p = sub.add_parser("synth", help="a labelled synthetic dataset from a conditional run")
    p.add_argument("run_dir")
    add_number(p, "--per-class", PER_CLASS, "images of every class", default=1000)
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="folder", choices=["folder", "idx"])
    p.set_defaults(handler=cmd_synth)

    p = sub.add_parser("evaluator", help="the per-dataset classifier whose features the metrics use")
    esub = p.add_subparsers(dest="evaluator_command", required=True)
    q = esub.add_parser("train", help="train (deterministically) and cache the evaluator of a dataset")
    q.add_argument("--data", required=True)
    add_number(q, "--epochs", field_ranges(EvaluatorConfig)["epochs"],
               "passes over the training split (default 2; 30 for emoji; 3 for the scenes judge)")
    q.add_argument("--kind", choices=("auto", "classifier", "contrastive"), default=None,
                   help="a classifier (needs classes) or contrastive (any images); default auto: the classifier "
                        "where the data has classes")
    add_number(q, "--held-out", HELD_OUT, "the test split is this share of a folder or zip, as its runs' "
               "data.held_out (the evaluator trains on the rest)", default=0.0)
    p.set_defaults(handler=cmd_evaluator)

    p = sub.add_parser("report", help="rebuild a run's report.html")
    p.add_argument("run_dir")
    p.set_defaults(handler=cmd_report)


def _print_metrics(metrics: dict) -> None:
    width = max(map(len, metrics))
    for k, v in metrics.items():
        print(f"{k:{width}s}  {v:.4g}" if isinstance(v, float) else f"{k:{width}s}  {json.dumps(v)}")


def cmd_evaluate(a) -> int:
    if a.anchors:
        from ..evaluate.anchors import evaluate_anchors
        if a.run_dir or not a.data:
            raise ConfigError("--anchors takes --data DATA and no run folder")
        out = evaluate_anchors(a.data, n=a.n, out_dir=a.out, held_out=a.held_out)
        for name, m in out["anchors"].items():
            print(f"== anchor {name}")
            _print_metrics(m)
        print(f"# written to {out['path']}")
        return 0
    if not a.run_dir:
        raise ConfigError("evaluate needs a run folder (or --anchors --data DATA)")
    from ..evaluate.run_eval import evaluate_run
    out = evaluate_run(a.run_dir, n=a.n, data=a.data, likelihood=a.likelihood or 0, prompts=a.prompts or 0)
    if a.tstr:
        from ..checkpoint import write_json_atomic
        from ..evaluate.synth import train_on_synthetic
        out["metrics"]["tstr"] = train_on_synthetic(a.run_dir, per_class=a.per_class)
        write_json_atomic(Path(a.run_dir) / "metrics.json", out)
    write_report(a.run_dir)
    _print_metrics(out["metrics"])
    p = out["protocol"]
    if "translated" in p:
        print(f"# translated {p['translated']} test images of {', '.join(p['domains'])}, judged by {p['evaluator']}; "
              f"written to {a.run_dir}/metrics.json")
        return 0
    if "seeds" not in p:   # an autoencoder: its reconstructions
        print(f"# {p['generated']} vs {p['real']} real ({p['data']} {p['real_split']}), evaluator {p['evaluator']}; "
              f"written to {a.run_dir}/metrics.json")
        return 0
    print(f"# {p['generated']} generated (seeds {p['seeds']}) vs {p['real']} real ({p['data']} {p['real_split']}), "
          f"evaluator {p['evaluator']}; written to {a.run_dir}/metrics.json")
    if "likelihood" in p:
        from ..evaluate.likelihood import PUBLISHED
        print(f"# bits/dim on {p['likelihood']['images']} test images, {p['likelihood']['dequantization']}")
        for name, value in PUBLISHED.get(p["data"], {}).items():
            print(f"#   published, {name}: {value}")
    return 0


def cmd_leaderboard(a) -> int:
    from ..evaluate.anchors import collect, leaderboard
    markdown, page = leaderboard(collect(a.paths))
    print(markdown)
    if a.html:
        Path(a.html).write_text(page)
        print(f"# HTML written to {a.html}")
    return 0


def cmd_analyse(a) -> int:
    from ..evaluate.analyse import analyse_folder, analyse_run
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
    from ..evaluate.synth import synthetic_dataset, write_dataset
    ds = synthetic_dataset(a.run_dir, a.per_class)
    out = write_dataset(ds, a.out, a.format)
    how = f"idx:{out}" if a.format == "idx" else f"folder:{out} --set data.size={ds.size}"
    print(f"wrote {len(ds)} images in {len(ds.classes)} classes to {out}; read back with --data {how}")
    return 0


def cmd_evaluator(a) -> int:
    if a.data == "scenes":   # no classes: its evaluator is the GenEval-style judge of the nine cells
        from ..evaluate.geneval import JudgeConfig, train_judge
        judge = train_judge(JudgeConfig(epochs=a.epochs or JudgeConfig.epochs))
        scores = judge.info["test_geneval"]
        print(f"judge {judge.name}: {judge.info['test_cell_accuracy']:.4f} of test cells right, "
              f"{judge.info['test_image_accuracy']:.4f} of test images with all nine right, GenEval-style score of "
              f"the real test images {scores['overall']:.4f} ({judge.info['train_seconds']} s of training)")
        return 0
    from ..evaluate.evaluator import default_config, train_evaluator
    ev = train_evaluator(default_config(a.data, epochs=a.epochs, kind=a.kind, held_out=a.held_out or None))
    measured = (f"test accuracy {ev.info['test_accuracy']:.4f}" if "test_accuracy" in ev.info else
                f"test retrieval {ev.info['test_retrieval']:.4f} (contrastive: no classes)")
    print(f"evaluator {ev.name}: {measured} on {ev.info['test_images']} images ({ev.info['train_seconds']} s of training)")
    return 0


def cmd_report(a) -> int:
    print(write_report(a.run_dir))
    return 0
