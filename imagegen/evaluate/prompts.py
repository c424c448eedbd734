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
from ..text import first_phrase
from .geneval import PROMPT_SEEDS


def test_prompts(run, n: int) -> list[str] | None:
    """Captions of the run's data, test split, cycled to n (None for a run without text)."""
    if not run.model.reads_text:
        return None
    test = load_data(DataConfig.as_saved(run.config.get("data", {}), "test"))
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


NAME_REPEATS = 4   # images per held-out name: 175 names x 4 on emoji, so one draw's luck moves the share less

# Colour words and their hue ranges in degrees (HSV hue, red wrapping round 0): the words of the emoji
# names ("red apple", "blue heart", "green book") that name a hue. Black, white and grey name none.
HUES = {"red": ((345, 360), (0, 15)), "orange": ((15, 45),), "yellow": ((45, 70),), "green": ((70, 170),),
        "blue": ((170, 260),), "purple": ((260, 320),), "pink": ((300, 345),), "brown": ((10, 40),)}


def dominant_hue(images: torch.Tensor) -> torch.Tensor:
    """N hues in degrees: the peak of each image's histogram (36 bins of 10 degrees) over its coloured
    pixels (saturation and value above 0.3 on images N x 3 x H x W in [-1, 1]; a grey image gets -1)."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    top, _ = x.max(1)
    low, _ = x.min(1)
    chroma = top - low
    r, g, b = x.unbind(1)
    safe = chroma.clamp_min(1e-6)
    hue = torch.where(top == r, ((g - b) / safe) % 6, torch.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    coloured = (chroma / top.clamp_min(1e-6) > 0.3) & (top > 0.3)
    out = []
    for h, keep in zip(hue, coloured):
        counts = torch.bincount((h[keep] / 10).long().clamp(0, 35), minlength=36)
        out.append(float(counts.argmax() * 10 + 5) if keep.sum() else -1.0)
    return torch.tensor(out)


def hue_matches(hue: float, word: str) -> bool:
    return any(lo <= hue < hi for lo, hi in HUES[word])


def name_prompt_accuracy(run, extractor, repeats: int = NAME_REPEATS, batch_size: int = 256) -> dict | None:
    """For a text run on data whose test captions begin with a name and whose classes the evaluator knows
    (`emoji`): each held-out test image's name (its caption's first phrase: names no training caption
    holds) drawn `repeats` times, name i with seeds PROMPT_SEEDS + i + k x names; the share the evaluator
    puts in that image's class, beside the same judge on the real test images (the ceiling) and the
    majority class's share (the floor of a guess); and for names with a colour word, the share whose
    dominant hue is that colour, generated and real. None for other runs."""
    classes = list(getattr(extractor, "info", {}).get("classes", []))
    if not run.model.reads_text or not classes or (run.data_source or "").startswith("captioned:"):
        return None
    test = load_data(DataConfig.as_saved(run.config.get("data", {}), "test"))
    if not (test.captioned and test.labelled and test.classes == classes):
        return None
    names = [first_phrase(c) for c in test.captions]
    images = generate(run.model, list(range(PROMPT_SEEDS, PROMPT_SEEDS + repeats * len(names))),
                      prompts=names * repeats, batch_size=batch_size)
    real = test.batch(torch.arange(len(test)))["image"]
    out = {"prompts": len(names), "images_per_prompt": repeats, "seeds": f"from {PROMPT_SEEDS}",
           "prompt": "the test caption's first phrase (up to its first comma)",
           "category_accuracy": round(float((extractor.probs(images).argmax(1) == test.labels.repeat(repeats)).float().mean()), 4),
           "category_accuracy_real": round(float((extractor.probs(real).argmax(1) == test.labels).float().mean()), 4),
           "majority_share": round(float(torch.bincount(test.labels).max() / len(test)), 4)}
    words = [next((w for w in name.split() if w in HUES), None) for name in names]
    coloured = [i for i, w in enumerate(words) if w]
    if coloured:
        drawn = [i + k * len(names) for k in range(repeats) for i in coloured]   # rows of `images`
        for key, pictures, rows in (("hue_accuracy", images, drawn), ("hue_accuracy_real", real, coloured)):
            hues = dominant_hue(pictures[rows])
            out[key] = round(sum(hue_matches(float(h), words[r % len(names)]) for h, r in zip(hues, rows)) / len(rows), 4)
        out["coloured_prompts"] = len(coloured)
    return out
