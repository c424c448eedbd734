"""GenEval-style scoring of text-to-image on the built-in `scenes` data.

Follows Ghosh et al., "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment"
(NeurIPS 2023): a prompt belongs to one of six tasks (single object, two objects, counting, colours,
position, colour attribution); an image is correct when what a judge finds in it meets every condition of
its prompt; a model's score is the share of correct images per task, and the overall score the mean of the
six. GenEval's judge is an object detector (Mask2Former) and CLIP for colours; ours is a small CNN
trained on `scenes` renders, which can be exact because the scenes are: every object sits in one cell of a
3x3 grid, so the judge classifies each cell into empty or one of 64 objects (shape x colour x size).

- `parse_caption` reads a caption of the `scenes` grammar ("two blue squares", "a large red star in the
  top left", "a green circle left of a yellow triangle") into what it asks for (`Prompt`);
- `satisfied` checks a prompt against the 9 cell classes of an image, as GenEval does: each named object
  present with the named attributes (extra objects allowed), the count exact for counting, the relation
  true of some pair of matching objects for position;
- `SceneJudge` (cells, and image features for FD) and `get_judge` (trained once on the train split,
  deterministic, cached with its SHA-256 under $IMAGEGEN_CACHE/judges/);
- `geneval` runs a text model on the test split's captions and scores it, next to the same judge on the
  real test images with their own captions.

Shapes: images N x 3 x H x W in [-1, 1] at any side (the judge resizes to 36 px, 12 px a cell).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_hashed_weights, save_hashed_weights, write_json_atomic
from ..config import MAX_BATCH, MAX_SEED, MAX_WIDTH, cache_path, from_dict, ranged, validate
from ..data import scenes as S
from ..errors import CheckpointError, ConfigError
from ..sample import generate, prompt_text, seed_generators, to_float

SIDE = 36        # the judge's image side: 12 px a cell
CELL = SIDE // S.GRID
MARGIN = 2       # each cell's crop reaches this far into its neighbours (a large star's tips touch the edge)
BATCH = 256
PROMPT_SEEDS = 2_000_000_000   # seeds of every prompt-following image (here and prompts.py): never FD's 0..n-1
HEADS = (1 + len(S.SHAPES), 1 + len(S.SHAPES) + len(S.COLOURS), 1 + len(S.SHAPES) + len(S.COLOURS) + len(S.SIZES))
RELATIONS = ("left of", "right of", "above", "below")


# --- what a caption asks for --------------------------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    """One object a prompt names (or a counted group): its shape and whichever of colour, size and cell
    the prompt gives (indices into scenes.COLOURS, SIZES, POSITIONS), and how many."""
    shape: int
    colour: int | None = None
    size: int | None = None
    cell: int | None = None
    count: int = 1

    def matches(self, obj: tuple[int, int, int], cell: int) -> bool:
        shape, colour, size = obj
        return (shape == self.shape and self.colour in (None, colour) and self.size in (None, size)
                and self.cell in (None, cell))


@dataclass(frozen=True)
class Prompt:
    task: str                      # one of scenes.TASKS
    objects: tuple[Wanted, ...]    # one, or two (the second is the relation's reference)
    relation: str | None = None    # position prompts: how objects[0] lies to objects[1]


_SHAPE = "|".join(S.SHAPES)
_COLOUR = "|".join(S.COLOUR_NAMES)
_SIZE = "|".join(S.SIZES)
_PLACE = "|".join(S.PLACES)
_NUMBER = "|".join(S.NUMBERS.values())
_PHRASE = rf"an? (?:({_SIZE}) )?(?:({_COLOUR}) )?({_SHAPE})(?: ({_PLACE}))?"
_COUNTED = re.compile(rf"({_NUMBER}) (?:({_COLOUR}) )?({_SHAPE})s")
_ONE = re.compile(_PHRASE)
_TWO = re.compile(rf"{_PHRASE} (and|{'|'.join(RELATIONS)}) {_PHRASE}")


def _wanted(size, colour, shape, place, count=1) -> Wanted:
    return Wanted(S.SHAPES.index(shape), None if colour is None else S.COLOUR_NAMES.index(colour),
                  None if size is None else S.SIZES.index(size), None if place is None else S.PLACES.index(place), count)


def parse_caption(caption: str) -> Prompt:
    """What a `scenes` caption asks for; a ConfigError names a caption outside the grammar."""
    text = " ".join(caption.lower().split())
    if m := _COUNTED.fullmatch(text):
        number = {v: k for k, v in S.NUMBERS.items()}[m[1]]
        return Prompt("counting", (_wanted(None, m[2], m[3], None, number),))
    if m := _ONE.fullmatch(text):
        w = _wanted(*m.groups())
        plain_colour = w.colour is not None and w.size is None and w.cell is None
        return Prompt("colours" if plain_colour else "single object", (w,))
    if m := _TWO.fullmatch(text):
        a, link, b = _wanted(*m.groups()[:4]), m[5], _wanted(*m.groups()[5:])
        if link != "and":
            return Prompt("position", (a, b), link)
        both_coloured = a.colour is not None and b.colour is not None
        return Prompt("colour attribution" if both_coloured else "two objects", (a, b))
    raise ConfigError(f"caption {caption!r} is not in the scenes grammar (one to three shapes among "
                      f"{', '.join(S.SHAPES)}, with colours, sizes, places and relations as scenes captions say them)")


def _related(a: int, b: int, relation: str) -> bool:
    """Is cell a `relation` cell b? Rows and columns of the 3x3 grid, as an observer reads them."""
    (ra, ca), (rb, cb) = divmod(a, S.GRID), divmod(b, S.GRID)
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def satisfied(prompt: Prompt, cells: list[int]) -> bool:
    """Does an image whose 9 cells hold these classes (0 empty, else scenes.cell_code) meet the prompt?"""
    objs = [(S.decode_cell(c), i) for i, c in enumerate(cells) if c]
    if prompt.task == "counting":
        (w,) = prompt.objects
        of_shape = [o for o, _ in objs if o[0] == w.shape]
        return len(of_shape) == w.count and all(w.colour in (None, o[1]) for o in of_shape)
    found = [[i for o, i in objs if w.matches(o, i)] for w in prompt.objects]
    if not all(found):
        return False
    if prompt.relation is None:
        return True
    return any(_related(a, b, prompt.relation) for a in found[0] for b in found[1] if a != b)


def score(prompts: list[Prompt], cells: torch.Tensor) -> dict:
    """{task: share correct, ..., "overall": mean over the tasks present, "images": {task: n}} for
    prompts and the judged cells of their images (N x 9)."""
    hits: dict[str, list[bool]] = {t: [] for t in S.TASKS}
    for p, c in zip(prompts, cells.tolist()):
        hits[p.task].append(satisfied(p, c))
    out = {t: round(sum(h) / len(h), 4) for t, h in hits.items() if h}
    out["overall"] = round(sum(out.values()) / len(out), 4)
    out["images"] = {t: len(h) for t, h in hits.items() if h}
    return out


# --- the judge ----------------------------------------------------------------------------------------


@dataclass
class JudgeConfig:
    epochs: int = ranged(3, 1, 1000)
    batch_size: int = ranged(64, 1, MAX_BATCH)   # images per step (9 cells each)
    lr: float = ranged(3e-3, 0.0, 1.0, lo_open=True)
    width: int = ranged(16, 1, MAX_WIDTH)        # channels of the first block; a cell's features are 2 * width
    seed: int = ranged(0, 0, MAX_SEED)
    limit: int = ranged(0, 1, 2**31 - 1, zero="all")   # train on the first N images only (tests)


def cell_crops(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W -> 9N x 3 x (CELL + 2 MARGIN)^2: each image at SIDE px, cut into its cells in reading
    order (image-major), each with MARGIN px of its neighbours."""
    x = images.float()
    if x.shape[-2:] != (SIDE, SIDE):
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False, antialias=True)
    x = F.pad(x, (MARGIN,) * 4, mode="replicate")
    k = CELL + 2 * MARGIN
    crops = x.unfold(2, k, CELL).unfold(3, k, CELL)           # N x 3 x 3 x 3 x k x k (rows, cols of cells)
    return crops.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, k, k)


class CellNet(nn.Module):
    """One classifier shared by the nine cells: conv-BN-ReLU at 16 and 8 px, average pool, and three heads:
    what is there (empty or one of the shapes), its colour and its size. Factored so that every object
    teaches the colour head whatever its shape is; `classes` combines them into scenes.cell_code."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(*block(3, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w), *block(2 * w, 2 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * w, HEADS[-1])

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """9N x 3 x k x k -> logits of (empty + shapes, colours, sizes): 9N x 5, 9N x 8, 9N x 2."""
        out = self.head(self.body(crops))
        return out[:, :HEADS[0]], out[:, HEADS[0]:HEADS[1]], out[:, HEADS[1]:]

    def loss(self, crops: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the three heads for cells (9N cell codes); colour and size on objects only."""
        what, colour, size = self(crops)
        true_shape, true_colour, true_size = S.cell_parts(cells.clamp(min=1))
        held = cells > 0
        return (F.cross_entropy(what, torch.where(held, true_shape + 1, 0))
                + F.cross_entropy(colour[held], true_colour[held]) + F.cross_entropy(size[held], true_size[held]))

    def classes(self, crops: torch.Tensor) -> torch.Tensor:
        """9N cell codes: 0 empty, else scenes.cell_code of the three heads' answers."""
        what, colour, size = (h.argmax(1) for h in self(crops))
        return torch.where(what > 0, S.cell_code(what - 1, colour, size), 0)


class SceneJudge:
    """A trained CellNet and its record (name with weight hash, config, test accuracy). Also a feature
    extractor for FD on `scenes`: an image's features are its nine cells' pooled features side by side,
    so where things are counts as much as what they are."""

    def __init__(self, net: CellNet, info: dict) -> None:
        self.net = net.eval().requires_grad_(False)
        self.info = info
        self.name = info["name"]

    @torch.no_grad()
    def _run(self, images: torch.Tensor, features: bool) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"judge {self.name} takes N x 3 x H x W images, got {tuple(images.shape)}")
        out = []
        for i in range(0, images.shape[0], BATCH):
            chunk = images[i:i + BATCH]
            crops = cell_crops(chunk)
            out.append(self.net.body(crops).reshape(len(chunk), -1) if features
                       else self.net.classes(crops).reshape(len(chunk), S.GRID * S.GRID))
        return torch.cat(out)

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        """N x 9 cell classes (0 empty, else scenes.cell_code), reading order."""
        return self._run(images, features=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """N x (9 * 2 width), float64 (the metrics' precision)."""
        return self._run(images, features=True).double()

    probs = None   # no classes for a whole image: the metrics that need them (IS, class coverage) are skipped


def fit_judge(cfg: JudgeConfig, train: S.Scenes, log=print) -> CellNet:
    """A CellNet trained on the cells of `train`: Adam, one-cycle schedule, batches from (seed, epoch),
    so the same data, config and machine give the same weights."""
    images, cells = to_float(train.images), train.cells
    if cfg.limit:
        images, cells = images[:cfg.limit], cells[:cfg.limit]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = CellNet(cfg.width)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    per_epoch = -(-len(images) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * per_epoch)
    net.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        for step in range(per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            loss = net.loss(cell_crops(images[idx]), cells[idx].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log and (step + 1) % 100 == 0:
                log(f"judge epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{per_epoch}  loss {loss.item():.3f}")
    return net.eval()


def judge_dir() -> Path:
    return cache_path("judges", "scenes")


def train_judge(cfg: JudgeConfig | None = None, *, out: Path | None = None, log=print) -> SceneJudge:
    """Train the judge on the scenes train split, measure it on the test split (cells right, images with
    all nine right, and the GenEval score of the real images under their own captions), and save it."""
    cfg = cfg or JudgeConfig()
    validate(cfg, "judge")
    t0 = time.perf_counter()
    net = fit_judge(cfg, S.make_scenes("train", first=cfg.limit or None), log)
    folder = Path(out) if out is not None else judge_dir()
    folder.mkdir(parents=True, exist_ok=True)
    digest = save_hashed_weights(folder / "weights.safetensors", net.state_dict(), "the judge")
    info = {"name": f"judge{2 * cfg.width}-scenes-{digest[:8]}", "sha256": digest, "config": asdict(cfg),
            "cell_classes": S.CELL_CLASSES, "train_seconds": round(time.perf_counter() - t0, 1)}
    judge = SceneJudge(net, info)
    test = S.make_scenes("test")
    found = judge.cells(to_float(test.images))
    info["test_cell_accuracy"] = round(float((found == test.cells).double().mean()), 5)
    info["test_image_accuracy"] = round(float((found == test.cells).all(1).double().mean()), 5)
    info["test_geneval"] = score([parse_caption(c) for c in test.captions], found)
    write_json_atomic(folder / "judge.json", info)
    return judge


def load_judge(folder: Path | None = None) -> SceneJudge:
    """The judge saved in `folder` (default: the cache), verified against its recorded SHA-256."""
    folder = Path(folder) if folder is not None else judge_dir()
    try:
        info = json.loads((folder / "judge.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no scenes judge in {folder}") from None
    weights = load_hashed_weights(folder / "weights.safetensors", info["sha256"], "judge.json")
    net = CellNet(from_dict(JudgeConfig, info["config"], "judge").width)
    net.load_state_dict(weights)
    return SceneJudge(net, info)


def get_judge(log=print) -> SceneJudge:
    """The cached judge, trained first (default config, a few minutes on 2 cores) when there is none."""
    if (judge_dir() / "judge.json").exists():
        return load_judge()
    if log:
        log(f"training the scenes judge (once; cached in {judge_dir()})")
    return train_judge(log=log)


# --- scoring a text model -----------------------------------------------------------------------------


@dataclass
class GenEvalProtocol:
    prompts: str = "the scenes test split's captions"
    prompt_count: int = 0
    images_per_prompt: int = 1
    seeds: str = f"from {PROMPT_SEEDS}"
    judge: str = ""
    judge_sha256: str = ""
    sampler: dict = field(default_factory=dict)


def geneval(run, judge: SceneJudge, *, prompts: int = 0, images_per_prompt: int = 1, batch_size: int = 256) -> dict:
    """Score a text run trained on `scenes`: images for the first `prompts` test captions (0 = all),
    `images_per_prompt` each (seeds PROMPT_SEEDS + k), judged per task, with the real test images under
    the same captions as the reference. {"generated": scores, "real": scores, "protocol": {...}}."""
    test = S.make_scenes("test", size=run.model.cfg.image_size)
    captions = test.captions[:prompts or None]
    asked = [c for c in captions for _ in range(images_per_prompt)]
    parsed = [parse_caption(c) for c in asked]
    images = generate(run.model, list(range(PROMPT_SEEDS, PROMPT_SEEDS + len(asked))), prompts=asked,
                      batch_size=batch_size)
    real = score([parse_caption(c) for c in captions], judge.cells(to_float(test.images)[:len(captions)]))
    sampler = run.model.sampling_settings()
    protocol = GenEvalProtocol(prompt_count=len(captions), images_per_prompt=images_per_prompt, judge=judge.name,
                               judge_sha256=judge.info["sha256"], sampler=sampler)
    out = {"generated": score(parsed, judge.cells(images)), "real": real, "protocol": asdict(protocol)}
    if run.model.draws_layouts:
        # A grounded model's layouts, scored as if they were the judged cells: drawn from the same seeds
        # as the images' (sampling draws each image's layout first), they tell a wrong plan from a
        # plan drawn wrong.
        seeds = list(range(PROMPT_SEEDS, PROMPT_SEEDS + len(asked)))
        text, _ = prompt_text(run.model, asked, len(asked))
        layouts = torch.cat([run.model.ground(text[i:i + batch_size], seed_generators(seeds[i:i + batch_size]))
                             .layout.cpu() for i in range(0, len(asked), batch_size)])
        out["layouts"] = score(parsed, layouts)
    return out
