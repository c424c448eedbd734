"""`scenes`: a built-in captioned dataset for text-to-image, deterministic like `shapes`.

RGB images (32x32 unless data.size asks for another side, drawn at that side, not resized) of one to
three objects on a dark background. An object is a shape (circle, square, triangle, star) in one of
eight named colours and one of two sizes, centred in one cell of a 3x3 grid whose cells have names
("top left" ... "centre" ... "bottom right"); objects never share a cell, so they never overlap.

Every image comes with its ground truth and one caption that the ground truth makes true. The scene is
built for one of the six tasks of GenEval (Ghosh et al., "GenEval: An Object-Focused Framework for
Evaluating Text-to-Image Alignment", NeurIPS 2023), and the caption is drawn from that task's templates:

| task             | objects                                 | a caption                                  |
|------------------|-----------------------------------------|--------------------------------------------|
| single object    | 1                                       | "a star", "a large red star in the top left" |
| two objects      | 2 of different shapes                   | "a circle and a square"                    |
| counting         | 2 or 3 of one shape (one colour or not) | "two blue squares", "three triangles"      |
| colours          | 1                                       | "a green circle"                           |
| position         | 2 of different shapes                   | "a green circle left of a yellow triangle" |
| colour attribution | 2 of different shapes and colours     | "a purple star and an orange square"       |

Ground truth per image (`Scenes.cells`, N x 9, cells in reading order): 0 for an empty cell, else
cell_code(shape, colour, size), and (`Scenes.order`) the cells of the objects in the order the caption
names them, which a layout prior learns from (nets/layout.py); a judge that classifies each cell into these 1 + 64 classes can score
any generated image against any caption's intent. The same seed always gives the same images and
captions; the train and test splits use different seeds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .shapes import convex_inside, regular_polygon

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {   # name -> RGB in [0, 1]; each object's colour is jittered by up to COLOUR_JITTER per channel
    "red": (0.86, 0.16, 0.16), "orange": (0.96, 0.55, 0.12), "yellow": (0.94, 0.86, 0.16),
    "green": (0.2, 0.7, 0.24), "cyan": (0.16, 0.78, 0.82), "blue": (0.16, 0.31, 0.9),
    "purple": (0.59, 0.24, 0.78), "white": (0.92, 0.92, 0.92),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
SIZE_RADIUS = (0.27, 0.4)           # radius as a fraction of a cell's side (a large star's tips reach 0.5)
COLOUR_JITTER = 0.06
GRID = 3
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
PLACES = ("in the top left", "at the top", "in the top right", "on the left", "in the centre", "on the right",
          "in the bottom left", "at the bottom", "in the bottom right")   # a position as captions say it
TASKS = ("single object", "two objects", "counting", "colours", "position", "colour attribution")
NUMBERS = {2: "two", 3: "three"}
MAX_OBJECTS = 3
CELL_CLASSES = 1 + len(SHAPES) * len(COLOURS) * len(SIZES)   # empty + every (shape, colour, size)

SPLIT_SIZE = {"train": 20_000, "test": 2_000}
SPLIT_SEED = {"train": 10, "test": 11}
SUPERSAMPLE = 4
CHUNK = 1000   # scenes drawn per call of _draw(): the random stream is consumed chunk by chunk


def cell_code(shape, colour, size):
    """The judge's class (1..64) of a cell holding this object; 0 is an empty cell. Ints or tensors."""
    return 1 + (shape * len(COLOURS) + colour) * len(SIZES) + size


def cell_parts(code):
    """(shape, colour, size) of cell classes >= 1, the inverse of cell_code. Ints or tensors."""
    rest, size = (code - 1) // len(SIZES), (code - 1) % len(SIZES)
    return rest // len(COLOURS), rest % len(COLOURS), size


def decode_cell(code: int) -> tuple[int, int, int] | None:
    """(shape, colour, size) of a cell's class, None for an empty cell."""
    return None if code == 0 else cell_parts(code)


@dataclass
class Scenes:
    images: torch.Tensor     # N x 3 x size x size, uint8
    cells: torch.Tensor      # N x 9, int64: 0 empty, else cell_code(shape, colour, size)
    order: torch.Tensor      # N x MAX_OBJECTS, int64: the cells of the objects in the order the caption names them, -1 after
    tasks: torch.Tensor      # N, int64: index into TASKS
    captions: list[str]      # N


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + "s"


def _describe(obj: tuple[int, int, int, int], detail: int) -> str:
    """A noun phrase for one object (shape, colour, size, cell): detail 0 shape only, 1 with colour, 2 with
    size and colour, 3 with size, colour and position."""
    shape, colour, size, cell = obj
    words = ([SIZES[size]] if detail >= 2 else []) + ([COLOUR_NAMES[colour]] if detail >= 1 else []) + [SHAPES[shape]]
    phrase = f"{_article(words[0])} {' '.join(words)}"
    return phrase + (f" {PLACES[cell]}" if detail == 3 else "")


def _relation(a: int, b: int) -> str:
    """How cell a lies to cell b, in words that are true of the grid: left of / right of when their
    columns differ, else above / below."""
    (ra, ca), (rb, cb) = divmod(a, GRID), divmod(b, GRID)
    if ca != cb:
        return "left of" if ca < cb else "right of"
    return "above" if ra < rb else "below"


def _scene(rng: np.random.Generator, task: int) -> tuple[list[tuple[int, int, int, int]], str]:
    """One scene for `task`: its objects (shape, colour, size, cell) and a caption true of them."""
    name = TASKS[task]
    n = {"single object": 1, "colours": 1, "counting": int(rng.integers(2, 4))}.get(name, 2)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    if name == "counting":
        shape = int(rng.integers(len(SHAPES)))
        same_colour = bool(rng.integers(2))
        c0 = int(rng.integers(len(COLOURS)))
        objs = [(shape, c0 if same_colour else int(rng.integers(len(COLOURS))), int(rng.integers(len(SIZES))), int(c))
                for c in cells]
        colour = f"{COLOUR_NAMES[c0]} " if same_colour else ""
        return objs, f"{NUMBERS[n]} {colour}{_plural(SHAPES[shape])}"
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    objs = [(int(s), int(c), int(rng.integers(len(SIZES))), int(cell)) for s, c, cell in zip(shapes, colours, cells)]
    if name == "single object":
        return objs, _describe(objs[0], int(rng.choice([0, 2, 3])))
    if name == "colours":
        return objs, _describe(objs[0], 1)
    if name == "two objects":
        return objs, f"{_describe(objs[0], 0)} and {_describe(objs[1], 0)}"
    if name == "position":
        return objs, f"{_describe(objs[0], 1)} {_relation(objs[0][3], objs[1][3])} {_describe(objs[1], 1)}"
    return objs, f"{_describe(objs[0], 1)} and {_describe(objs[1], 1)}"   # colour attribution


def _masks(shape: str, cx, cy, r, theta, px, py) -> np.ndarray:
    """Coverage masks (N x P, bool) of N objects of one shape at centres (cx, cy), radii r, rotations theta,
    at the points (px, py: N x P or 1 x P)."""
    X, Y = np.broadcast_to(px, (len(cx), px.shape[1])), np.broadcast_to(py, (len(cx), px.shape[1]))
    if shape == "circle":
        return (X - cx[:, None]) ** 2 + (Y - cy[:, None]) ** 2 <= r[:, None] ** 2
    if shape == "square":
        return convex_inside(X, Y, *regular_polygon(cx, cy, r * 1.1, theta + np.pi / 4, 4))
    if shape == "triangle":
        return convex_inside(X, Y, *regular_polygon(cx, cy, r * 1.2, theta - np.pi / 2, 3))
    # a five-pointed star, point up: the union of five convex kites (centre, inner, outer, inner vertex)
    ox, oy = regular_polygon(cx, cy, r * 1.25, theta - np.pi / 2, 5)
    ix, iy = regular_polygon(cx, cy, r * 0.52, theta - np.pi / 2 + np.pi / 5, 5)
    m = np.zeros(X.shape, dtype=bool)
    for k in range(5):
        m |= convex_inside(X, Y, np.stack([cx, ix[:, k - 1], ox[:, k], ix[:, k]], 1),
                            np.stack([cy, iy[:, k - 1], oy[:, k], iy[:, k]], 1))
    return m


def _draw(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, ...]:
    """n scenes: (uint8 n x 3 x size x size, cells n x 9, order n x MAX_OBJECTS, tasks n, captions)."""
    tasks = rng.integers(len(TASKS), size=n)
    scenes = [_scene(rng, int(t)) for t in tasks]
    cells = np.zeros((n, GRID * GRID), dtype=np.int64)
    order = np.full((n, MAX_OBJECTS), -1, dtype=np.int64)
    objs = []   # (image, shape, colour, size, cell) of every object
    for i, (found, _) in enumerate(scenes):
        for k, (shape, colour, sz, cell) in enumerate(found):   # in the order the caption names them
            cells[i, cell] = cell_code(shape, colour, sz)
            order[i, k] = cell
            objs.append((i, shape, colour, sz, cell))
    o = np.array(objs, dtype=np.int64).reshape(-1, 5)
    side = size / GRID
    row, col = np.divmod(o[:, 4], GRID)
    r = (np.array(SIZE_RADIUS)[o[:, 3]] * side).astype(np.float32)
    slack = (0.5 * side - 1.3 * r).clip(min=0)   # centres move inside the cell without leaving it
    cx = ((col + 0.5) * side + rng.uniform(-1, 1, len(o)) * slack).astype(np.float32)
    cy = ((row + 0.5) * side + rng.uniform(-1, 1, len(o)) * slack).astype(np.float32)
    theta = rng.uniform(-0.2, 0.2, len(o)).astype(np.float32)          # a slight tilt, shapes stay upright
    rgb = np.array(list(COLOURS.values()))[o[:, 2]] + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, (len(o), 3))
    bg = rng.uniform(0.03, 0.18, (n, 1)) + rng.uniform(-0.02, 0.02, (n, 3))   # dark, slightly tinted
    # Each object is drawn in a window of w x w pixels around it (it covers one cell of the nine), at
    # SUPERSAMPLE^2 points per pixel, then painted onto its image.
    w = min(size, int(np.ceil(side * 1.1)) + 2)
    ox = np.clip(np.floor(cx - w / 2), 0, size - w).astype(np.int64)
    oy = np.clip(np.floor(cy - w / 2), 0, size - w).astype(np.int64)
    local = ((np.arange(w * SUPERSAMPLE) + 0.5) / SUPERSAMPLE).astype(np.float32)
    ly, lx = (g.reshape(1, -1) for g in np.meshgrid(local, local, indexing="ij"))
    cover = np.zeros((len(o), w, w), dtype=np.float32)
    for k, name in enumerate(SHAPES):
        sel = np.flatnonzero(o[:, 1] == k)
        if sel.size:
            m = _masks(name, cx[sel], cy[sel], r[sel], theta[sel], ox[sel, None] + lx, oy[sel, None] + ly)
            cover[sel] = m.reshape(sel.size, w, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(2, 4))
    img = np.repeat(bg[:, :, None, None], size, 2).repeat(size, 3)
    for j in range(len(o)):   # objects keep to their cells, so painting order hardly matters
        i, win = o[j, 0], np.s_[oy[j]:oy[j] + w, ox[j]:ox[j] + w]
        img[i][:, win[0], win[1]] += (rgb[j][:, None, None] - img[i][:, win[0], win[1]]) * cover[j][None]
    images = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return images, cells, order, tasks.astype(np.int64), [caption for _, caption in scenes]


def make_scenes(split: str = "train", size: int = 32, first: int | None = None, n: int | None = None,
                seed: int | None = None) -> Scenes:
    """The `scenes` split at side `size`: images, ground truth, tasks and captions. `first` (data.limit)
    draws only the chunks that hold the first images (the same images as in the whole split). Cached per
    process: callers must not modify the tensors in place."""
    n = SPLIT_SIZE[split] if n is None else n
    stop = n if first is None else min(n, -(-first // CHUNK) * CHUNK)
    return _render_split(split, n, size, SPLIT_SEED[split] if seed is None else seed, stop)


@functools.lru_cache(maxsize=4)
def _render_split(split: str, n: int, size: int, seed: int, stop: int) -> Scenes:
    rng = np.random.default_rng(seed)
    parts = [_draw(rng, min(CHUNK, stop - i), size) for i in range(0, stop, CHUNK)]
    return Scenes(images=torch.from_numpy(np.concatenate([p[0] for p in parts])),
                  cells=torch.from_numpy(np.concatenate([p[1] for p in parts])),
                  order=torch.from_numpy(np.concatenate([p[2] for p in parts])),
                  tasks=torch.from_numpy(np.concatenate([p[3] for p in parts])),
                  captions=[c for p in parts for c in p[4]])
