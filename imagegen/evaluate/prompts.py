"""How well a text model follows its prompts, and the prompts a text run is measured with.

`test_prompts`: a text run's FD is measured on images drawn for the captions of its data's test split
(seed i with caption i), as text-to-image papers measure FID on the captions of a validation set; without
them the images would all come from the null text.

`class_prompt_accuracy`, for a run trained on `captioned:SOURCE` (data/captions.py): for every class,
images drawn for prompts that training captions use and for held-out ones (new templates, and
paraphrases such as "a running shoe" that no training caption contains), and the share that the data's
evaluator classifies as the prompted class, per set: the Fashion-MNIST part of issue 16's evaluation.
"""

from __future__ import annotations

import torch

from ..data import DataConfig, load_data
from ..data.captions import held_out_prompts, training_prompts
from ..sample import generate
from .geneval import PROMPT_SEEDS


def test_prompts(run, n: int) -> list[str] | None:
    """Captions of the run's data, test split, cycled to n (None for a run without text)."""
    if not run.model.reads_text:
        return None
    saved = run.config.get("data", {})
    test = load_data(DataConfig(source=run.data_source, split="test", size=int(saved.get("size", 0)),
                                channels=int(saved.get("channels", 0))))
    if not test.captioned:
        return None
    return [test.captions[i % len(test.captions)] for i in range(n)]


def class_prompt_accuracy(run, extractor, per_class: int = 100, batch_size: int = 256) -> dict | None:
    """{"training_prompts": accuracy, "held_out_prompts": accuracy, "per_class": {...}, ...} for a text run
    on captioned:SOURCE whose classes the evaluator knows; None otherwise."""
    source = run.data_source or ""
    classes = list(getattr(extractor, "info", {}).get("classes", []))
    if not run.model.reads_text or not source.startswith("captioned:") or not classes:
        return None
    out: dict = {"images_per_class_and_set": per_class, "seeds": f"from {PROMPT_SEEDS}", "per_class": {}}
    totals = {"training_prompts": [], "held_out_prompts": []}
    seed = PROMPT_SEEDS
    for k, cls in enumerate(classes):
        row = {}
        for name, prompts in (("training_prompts", training_prompts(cls)), ("held_out_prompts", held_out_prompts(cls))):
            if not prompts:
                continue
            asked = [prompts[i % len(prompts)] for i in range(per_class)]
            images = generate(run.model, list(range(seed, seed + per_class)), prompts=asked, batch_size=batch_size)
            seed += per_class
            hits = (extractor.probs(images).argmax(1) == k).float()
            row[name] = round(float(hits.mean()), 4)
            totals[name].append(hits)
        out["per_class"][cls] = row
    for name, hits in totals.items():
        if hits:
            out[name] = round(float(torch.cat(hits).mean()), 4)
    return out
