"""Captions for labelled data: `--data captioned:SOURCE` (e.g. captioned:fashion-mnist, captioned:shapes,
captioned:folder:PATH with class subfolders) gives every image a caption built from its class.

A caption is a template ("a photo of a {}") filled with one of the class's names ("sneaker", "trainer");
both are drawn per image from a generator seeded by the image's index, so the captions are fixed for a
dataset. For Fashion-MNIST and shapes, each class also has paraphrases that no training caption uses
("a running shoe", "a purse"): `held_out_prompts` gives them, with templates no training caption uses
either, so an evaluation can ask whether a model follows words it never saw with these images, through
what the frozen text encoder knows of them. Any other labelled source uses its class names as they are.
"""

from __future__ import annotations

import random
from typing import Sequence

TEMPLATES = ("a {}", "a photo of a {}", "a picture of a {}", "an image of a {}", "a {} on a plain background",
             "a small {}", "a grey {}")
HELD_OUT_TEMPLATES = ("a drawing of a {}", "there is a {}")

# class name -> (names used in training captions, paraphrases kept for evaluation)
PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # Fashion-MNIST
    "T-shirt/top": (("t-shirt", "tee", "top"), ("short-sleeved top",)),
    "Trouser": (("pair of trousers", "pair of pants", "pair of jeans"), ("pair of slacks",)),
    "Pullover": (("pullover", "sweater", "jumper"), ("woolly cardigan",)),
    "Dress": (("dress", "gown", "frock"), ("summer dress",)),
    "Coat": (("coat", "jacket", "overcoat"), ("winter parka",)),
    "Sandal": (("sandal", "flip-flop", "strappy sandal"), ("open-toed shoe",)),
    "Shirt": (("shirt", "button-up shirt", "blouse"), ("collared shirt",)),
    "Sneaker": (("sneaker", "trainer", "sports shoe"), ("running shoe",)),
    "Bag": (("bag", "handbag", "tote bag"), ("purse",)),
    "Ankle boot": (("ankle boot", "boot", "bootie"), ("short leather boot",)),
    # shapes
    "circle": (("circle", "disc", "round shape"), ("ring-shaped blob",)),
    "square": (("square", "box", "four-sided shape"), ("quadrilateral",)),
    "triangle": (("triangle", "three-sided shape", "wedge"), ("pyramid outline",)),
    "star": (("star", "five-pointed star", "star shape"), ("asterisk-like figure",)),
}


def names_of(cls: str) -> tuple[str, ...]:
    """The names training captions use for a class: its phrases, else the class name in lower case."""
    known = PHRASES.get(cls)
    return known[0] if known else (cls.replace("_", " ").replace("-", " ").lower(),)


def class_captions(labels: Sequence[int], classes: Sequence[str], seed: int = 0) -> list[str]:
    """One caption per label: a training template filled with one of the class's names, drawn from a
    generator seeded by (seed, the image's index), so image i's caption does not depend on the others."""
    out = []
    for i, y in enumerate(labels):
        rng = random.Random(seed * 1_000_003 + i)
        out.append(rng.choice(TEMPLATES).format(rng.choice(names_of(classes[int(y)]))))
    return out


def training_prompts(cls: str) -> list[str]:
    """Every caption training can give a class (each template with each name)."""
    return [t.format(name) for t in TEMPLATES for name in names_of(cls)]


def held_out_prompts(cls: str) -> list[str]:
    """Prompts for a class that no training caption contains: held-out templates with the training names,
    and every template with the held-out paraphrases. Empty for a class without paraphrases."""
    if cls not in PHRASES:
        return []
    names, paraphrases = PHRASES[cls]
    return ([t.format(n) for t in HELD_OUT_TEMPLATES for n in names] +
            [t.format(p) for t in TEMPLATES + HELD_OUT_TEMPLATES for p in paraphrases])
