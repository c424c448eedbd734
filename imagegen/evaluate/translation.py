"""Evaluate a translation run (CycleGAN): how often translated test images are recognised as the target
domain, how well they come back round the cycle, and how close they are to the real target domain.

The judge is a domain classifier: for domains cut from a labelled dataset (pair:fashion-mnist:A,B) it is
that dataset's evaluator, all of its classes competing (so a sneaker turned into a bag counts as a miss);
for folder pairs (pair:DIR) it is the evaluator architecture trained on trainA vs trainB, cached like
any evaluator.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..checkpoint import Run, write_json_atomic
from ..data import load_data
from ..errors import ConfigError
from ..sample import to_float
from . import metrics as M
from .evaluator import get_evaluator, run_data


def domain_judge(test, data_cfg, log=print):
    """(evaluator, (class index of A, class index of B)) for a PairedDataset's domains, at the size and
    channels the run was trained at."""
    size, channels = data_cfg.size, data_cfg.channels
    if test.base is not None:
        return get_evaluator(test.base, size=size, channels=channels, log=log), test.base_classes
    return get_evaluator(data_cfg.source, size=size, channels=channels, log=log), (0, 1)


def evaluate_translation(run: Run, *, n: int = 10_000, data: str | None = None, log=print) -> dict:
    """metrics.json for a loaded translation run: up to n test images of each domain translated both
    ways (evaluate_run loads the run, checks n and calls this)."""
    model = run.model
    data_cfg = run_data(run, data)
    data = data_cfg.source
    test = load_data(data_cfg)
    if not hasattr(test, "domains"):
        raise ConfigError(f"--data {data!r} is not a pair of domains (use pair:DIR or pair:SOURCE:A,B)")
    judge, targets = domain_judge(test, data_cfg, log)

    result, seconds = {}, {}
    for direction, src, dst, target in (("a2b", test.a, test.b, targets[1]), ("b2a", test.b, test.a, targets[0])):
        x = to_float(src.images[:n])
        t0 = time.perf_counter()
        there, back = model.cycle(x, direction)
        seconds[direction] = round(time.perf_counter() - t0, 2)
        there, back = there.cpu(), back.cpu()
        real = to_float(dst.images)
        result[f"{direction}_to_target"] = float((judge.probs(there).argmax(1) == target).double().mean())
        # The same judge on the real target images: the ceiling the share above can reach.
        result[f"{direction}_real_target"] = float((judge.probs(real).argmax(1) == target).double().mean())
        result[f"{direction}_cycle_l1"] = float((back - x).abs().mean())
        result[f"{direction}_FD-{judge.name}"] = M.frechet_distance(judge.features(real), judge.features(there))
    out = {
        "run": str(run.path), "family": run.family, "step": run.step,
        "protocol": {"translated": {"a2b": min(n, len(test.a)), "b2a": min(n, len(test.b))},
                     "inputs": "the first n images of each domain's test split", "real_split": "test",
                     "real": {"a": len(test.a), "b": len(test.b)}, "data": data,
                     "domains": list(test.domains), "evaluator": judge.name,
                     "evaluator_sha256": judge.info.get("sha256"),
                     "target_classes": [judge.info["classes"][t] for t in targets], "weights": "ema",
                     "to_target": "share of translated images the evaluator assigns to the target domain's class",
                     "cycle_l1": "mean |x - G_back(G_there(x))| in [-1, 1] pixel units"},
        "metrics": result,
        "translation_seconds": seconds,
    }
    write_json_atomic(Path(run.path) / "metrics.json", out)
    return out
