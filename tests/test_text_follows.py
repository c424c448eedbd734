"""A tiny text model follows its colour and shape words (issue 16): a flow trained briefly on `scenes`.

As tests/test_conditional.py does for class labels, the main check is paired: for the same noise and
the same other words, the image drawn for "a large red star" must be, of the four drawn for red, green,
blue and yellow, the one that is reddest; and of the four drawn for circle, square, triangle and star,
the one a shape classifier finds most star-like. A model that ignored the word would score 1/4 (sd
about 0.03 over the 256 decisions of each check); we ask for 0.4. Colour is judged without training:
the mean colour of an image's bright pixels, nearest of the four named colours. Shape is judged by a
small CNN trained here on the one-object scenes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import imagegen
from imagegen.data import scenes as S

SIZE = 24
COLOURS = ("red", "green", "blue", "yellow")
N = 16   # noises per (colour, shape)

# Steps: enough to clear 0.4 on both checks with a margin, no more. Measured at 400 on AVX-512, AVX2 and
# SSE4.1 (machine B): paired colour 0.66, 0.59, 0.56; paired shape 0.49, 0.47, 0.48. About 75 s on 2 cores.
STEPS = 400

# trained weights are judged (so `make test` runs it under the lower instruction set only); caption
# embeddings go to a cache of this module's own. Training takes about 3 to 4 minutes of one core, the
# longest test by far, and it was tuned on all three instruction sets (above).
pytestmark = [pytest.mark.trained, pytest.mark.usefixtures("private_cache")]


@pytest.fixture(scope="module")
def shape_classifier():
    """A CNN from image to shape, trained on the one-object scenes (tasks single object and colours)."""
    torch.manual_seed(0)

    def one_object(split: str):
        sc = S.make_scenes(split, size=SIZE, first=2000 if split == "train" else None)
        keep = [i for i, c in enumerate(sc.cells.tolist()) if sum(x > 0 for x in c) == 1]
        shapes = torch.tensor([S.decode_cell(max(sc.cells[i].tolist()))[0] for i in keep])
        return sc.images[keep].float() / 127.5 - 1, shapes

    x, y = one_object("train")
    net = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 4))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tx, ty = one_object("test")
    with torch.no_grad():
        acc = (net(tx).argmax(1) == ty).float().mean()
    assert acc > 0.9, f"the shape judge itself must be good: {acc:.3f}"
    return net.eval()


def colour_scores(images: torch.Tensor) -> torch.Tensor:
    """N x 4: minus the distance of each image's mean bright-pixel colour (in [0, 1]) to each of COLOURS."""
    x = (images + 1) / 2                                     # N x 3 x H x W
    bright = (x.amax(1, keepdim=True) > 0.35).float()         # the background stays under 0.2
    mean = (x * bright).sum((2, 3)) / bright.sum((2, 3)).clamp(min=1)
    palette = torch.tensor([S.COLOURS[c] for c in COLOURS])
    return -torch.cdist(mean, palette)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    cfg = imagegen.resolve_config({
        "family": "flow", "model": {"width": 16, "mults": [1, 2], "sample_steps": 10, "guidance": 3.0},
        "data": {"source": "scenes", "size": SIZE, "limit": 1000},
        "train": {"steps": STEPS, "batch_size": 32, "sample_every": 0, "grid_size": 4, "log_every": 100,
                  "checkpoint_every": STEPS}})
    return imagegen.load_run(imagegen.train(cfg, out=tmp_path_factory.mktemp("text"), progress=False))


def paired(scores: torch.Tensor) -> float:
    """scores[l, i, c]: the judge's score for class c of image i drawn with word l. The share of (i, c)
    for which the image drawn with word c scores highest for c among the four words."""
    return (scores.argmax(0) == torch.arange(scores.shape[0])).float().mean().item()


def test_a_tiny_text_model_follows_colour_and_shape_words(text_run, shape_classifier):
    seeds = list(range(N))
    # images[colour][shape]: N images each, the same N noises throughout
    images = [[imagegen.generate(text_run.model, seeds, prompts=f"a large {c} {s}") for s in S.SHAPES] for c in COLOURS]
    with torch.no_grad():
        # colour: for each shape, the four colours' images; shape: for each colour, the four shapes'
        by_colour = torch.cat([torch.stack([colour_scores(images[c][s]) for c in range(4)]) for s in range(4)], 1)
        by_shape = torch.cat([torch.stack([shape_classifier(images[c][s]).softmax(1) for s in range(4)]) for c in range(4)], 1)
    colour, shape = paired(by_colour), paired(by_shape)
    print(f"paired colour {colour:.3f}, paired shape {shape:.3f}")
    assert colour >= 0.4 and shape >= 0.4
