"""The interface every model family implements, and the helpers the families share (per-image noise,
eval mode, channels-last views); the fixed micro-batches that make sampling per-seed exact are in
runtime/batching.py.

| member                                  | contract                                                      |
|-----------------------------------------|---------------------------------------------------------------|
| `name`, `summary` (class attributes)    | the registry's key; one line on what it is, for the family table |
| `Config` dataclass (class attribute)    | every constructor hyper-parameter, JSON-serialisable          |
| `__init__(cfg)`                         | builds networks only: no data, no device moves, no files      |
| `configure_optimizers(train_cfg)`       | {"g": ..., "d": ...}; the loop owns and checkpoints them      |
| `train_step(batch, opt, gen)`           | forward, losses, self.backward(loss), steps; {name: float}    |
| `sample(n, *, labels, generator, ...)`  | n x C x H x W in [-1, 1]                                      |
| `fit_config(cfg, dataset)` (classmethod)| the config completed from the data (size, channels, classes)  |
| `ready(dataset, log)` (optional)        | on every run, new or resumed: what its batches need attached  |
| `prepare(dataset, steps)` (optional)    | once before step 0 of a new run (statistics, a first stage)   |
| `train_defaults` (class attribute)      | the family's own TrainConfig defaults (steps, batch size...)  |
| `sample_options` (class attribute)      | {name: SampleOption}: the keyword options `sample` accepts; the one source of the CLI flags, the HTTP fields, /api/models and the page's controls |
| `needs_labels` (class attribute)        | True when the family cannot train on unlabelled data          |
| `translates` (class attribute)          | True for translation families (images in, not noise in)       |
| `made_by` (class attribute)             | the command that makes such runs when not `train` ("distill") |
| `reads_text` (attribute)                | True when `sample` takes `text` (trained on captions: backbone.py) |
| `preview(dataset, n)` (translation)     | (images, per row) for the training grids (sample.preview: n seeds otherwise) |
| `run(fn, *xs)` (given)                  | the one doorway through which a family's sampling runs a network |

Optional abilities are declared, each a class attribute with one default (False): code outside models/
asks these, never `hasattr`, and never compares a family's name. `tests/test_architecture.py` checks
that each family declares exactly the methods it has, and that nothing outside models/ discovers them.

| ability                 | the family implements                                        | used by                        |
|-------------------------|--------------------------------------------------------------|--------------------------------|
| `has_latent`            | `draw_noise(n, generator)` -> n x z_dim; `sample(noise=z)`; `latent_network()` | latent sliders, directions, interpolation, latent variations |
| `encodes`               | `encode(x, labels)` -> (mu, logvar); `reconstruct(x, labels)` | variations of files, interpolating images, reconstruction error |
| `edits`                 | `edit(image, strength, ...)`: SDEdit from a noised image      | variations, sketches           |
| `inpaints`              | `inpaint(image, mask, ...)`: where mask == 1 generated        | inpaint, outpaint, the mask brush |
| `has_critic`            | `critic(x, labels)`: a discriminator's realism logit          | analyse, rejection sampling    |
| `has_likelihood`        | `log_likelihood(x, ...)` per image; `likelihood_estimator()`  | bits/dim                       |
| `conditional_likelihood`| its likelihood is log p(x given class) when conditional     | analyse --images refuses it    |
| `has_null_class`        | class index `num_classes` is the null class (guidance)        | export's example labels        |
| `trains_in_studio`      | nothing more: it trains from a folder of images in minutes    | the studio's training (serve/jobs.py) |
| `learns_latents`        | nothing more: its config takes `model.autoencoder` (an ae run; models/latent.py) | the studio's latent training (serve/jobs.py) |
| `distillable`           | `from_noise(z, labels, steps)`: a deterministic map of noise   | a teacher for `imagegen distill` |
| `export_spec(direction)` | the sampling graph (ExportSpec); the default refuses: no network | ONNX export, the onnxruntime engine |
| `draws_layouts` (property) | a layout prior drawn before the image (grounded text models) | the GenEval layout scores    |
| `validates`             | `validation_loss(batch, gen)`: the training objective on held-out images, draws from gen | the validation loss in log.jsonl |
| `autoencodes`           | `to_latent(x)`, `from_latent(z)`, `round_trip(x)`; draws nothing from noise: `preview` and evaluation are of reconstructions | the first stage of latent flow and ddpm (models/latent.py) |

A family is conditional when its config has `num_classes` > 0 (filled in from the data): `sample` then
takes `labels` (a long tensor of n class indices).

`gen` / `generator` are explicit torch.Generators: the loop hands `train_step` one seeded per step, so
training is reproducible and resumable without saving RNG state. `sample` takes either one generator or a
list of n, one per image, so that an image depends only on its own seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..config import Range
from ..errors import ConfigError, ExportError
from ..runtime.batching import cached_on, is_channels_last, run_fixed_batch

Generators = torch.Generator | Sequence[torch.Generator] | None

@dataclasses.dataclass
class ExportSpec:
    """A family's sampling graph, as export.py writes it to ONNX and the onnxruntime engine runs it:
    fn(*inputs) -> outputs, with N a dynamic batch. Input names: `z` (a latent, N x z_dim, or noise
    N x C x S x S), `x` (an image at some time), `image`, `time`, `label` (int64 N; the null class too where
    has_null_class), `text_pooled`, `text_tokens`, `text_mask` (imagegen/text.py)."""
    fn: Callable[..., torch.Tensor]
    inputs: list[str]
    outputs: list[str]
    usage: str                                   # one line: how to drive the graph
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    time_steps: int = 0                          # `time` is an int64 step in 0..time_steps-1 (else a float in [0, 1])


@dataclasses.dataclass(frozen=True)
class SampleOption:
    """One keyword option of a family's `sample`, and the one source of everything built from it: the
    CLI flag `--NAME` (models.SAMPLE_OPTIONS, over all families), the field of the HTTP request bodies,
    the option's entry in GET /api/models and its control on the page (a slider or a menu)."""
    help: str
    range: Range | None = None                    # a number, checked against it
    choices: tuple[str, ...] = ()                 # or the name of a method, one of these
    slider: tuple[float, float, float, float] | None = None   # the page's slider: min, max, step, start value
    menu: tuple[str, ...] = ()                    # the page's menu, when not every choice (the first is shown)
    served: bool = True                           # offered over HTTP and on the page
    served_max: float | None = None               # the server's cap, below the range's top (a request's work)

    def __post_init__(self) -> None:
        if (self.range is None) == (not self.choices):
            raise TypeError("a SampleOption is a number (range) or a choice (choices), exactly one")
        if self.served and self.range is not None and self.slider is None:
            raise TypeError("a served number option needs its page slider (or served=False)")

    @property
    def kind(self) -> type:
        return str if self.range is None else self.range.kind

    def check(self, value: Any, key: str) -> Any:
        """value, or a ConfigError naming key, value and what it must be."""
        if self.range is not None:
            return self.range.check(value, key)
        if value not in self.choices:
            raise ConfigError(f"{key} must be one of {', '.join(self.choices)}, got {value!r}")
        return value

    def bounds(self) -> dict:
        """The served range as pydantic Field bounds (numbers; {} for choices)."""
        if self.range is None:
            return {}
        bounds = self.range.bounds()
        if self.served_max is not None:
            bounds.pop("lt", None)
            bounds["le"] = self.range.kind(self.served_max)
        return bounds

    def control(self) -> dict[str, Any]:
        """The page's control and help, as GET /api/models describes the option."""
        if self.range is None:
            return {"help": self.help, "choices": list(self.menu or self.choices)}
        lo, hi, step, value = self.slider
        return {"help": self.help, "min": lo, "max": hi, "step": step, "value": value}


SAMPLING_KEYS = ("sampler", "solver", "sample_steps", "eta", "guidance")   # Family.sampling_settings


def first_activation_after_conv(body: nn.Sequential) -> nn.Module:
    """The first activation after the first convolution of a generator's body: where its first block's
    features are (Family.latent_network)."""
    seen_conv = False
    for layer in body:
        seen_conv = seen_conv or isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))
        if seen_conv and isinstance(layer, (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU)):
            return layer
    raise ConfigError("the generator has no activation after a convolution to take features from")


class Family(nn.Module):
    """Base class of the model families (see the module docstring for the contract)."""

    Config: ClassVar[type]
    name: ClassVar[str]
    summary: ClassVar[str]                 # one line for `imagegen models` and the README's family table
    needs_labels: ClassVar[bool] = False
    translates: ClassVar[bool] = False
    made_by: ClassVar[str | None] = None   # e.g. "distill": trained from a teacher run, not from images
    reads_text = False                     # a property of the families that can be trained on captions
    train_defaults: ClassVar[dict[str, Any]] = {}
    sample_options: ClassVar[dict[str, SampleOption]] = {}
    # Optional abilities (the table in the module docstring): what the family implements, declared.
    has_latent: ClassVar[bool] = False
    encodes: ClassVar[bool] = False
    edits: ClassVar[bool] = False
    inpaints: ClassVar[bool] = False
    has_critic: ClassVar[bool] = False
    has_likelihood: ClassVar[bool] = False
    conditional_likelihood: ClassVar[bool] = False
    has_null_class: ClassVar[bool] = False
    distillable: ClassVar[bool] = False
    autoencodes: ClassVar[bool] = False
    validates: ClassVar[bool] = False
    trains_in_studio: ClassVar[bool] = False   # offered by the studio's "train on your images" (serve/jobs.py)
    learns_latents: ClassVar[bool] = False     # model.autoencoder = RUN trains it on an ae run's latents
    draws_layouts = False                  # a property of the families that can be grounded (backbone.py)

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg

    @property
    def num_classes(self) -> int:
        return int(getattr(self.cfg, "num_classes", 0))

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def device(self) -> torch.device:
        return _first_tensor(self).device

    def run(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor | None) -> torch.Tensor:
        """fn(*xs) as every sampling call of a family runs a network: in fixed micro-batches, each row with
        the bits of a full chunk, on the engine set for the family (runtime/batching.run_fixed_batch)."""
        return run_fixed_batch(fn, *xs, owner=self)

    def sampling_settings(self) -> dict[str, Any]:
        """The config's sampling defaults (sampler, solver, steps, eta, guidance: those it has), for the
        protocol that metrics.json and a distilled run record."""
        return {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(self.cfg) if f.name in SAMPLING_KEYS}

    def latent_network(self) -> tuple[nn.Module, Callable, nn.Module]:
        """(the network from latents to images, its call on (z, labels), the module whose output is its
        first block's features): what the GANSpace directions analyse (families with has_latent)."""
        raise ConfigError(f"model family {self.name!r} has no latent space to find directions in "
                          "(--directions is for GANs and VAEs)")

    def export_spec(self, direction: str = "a2b") -> ExportSpec:
        """The sampling network as a graph (ExportSpec); families without one refuse."""
        raise ExportError(f"model {self.name!r} has no network to export")

    def likelihood_estimator(self) -> str:
        """How `log_likelihood` estimates log p, for metrics.json (families with has_likelihood)."""
        raise ConfigError(f"model {self.name!r} has no likelihood")

    @classmethod
    def fit_config(cls, cfg, dataset):
        """The config with what the data decides filled in: image size, channels, number of classes.
        Families with data-dependent defaults (e.g. DiffAugment below 10k images) extend this."""
        if getattr(dataset, "domains", None) is not None and not cls.translates:
            raise ConfigError(f"{dataset.name!r} is a pair of domains, which only translation models (cyclegan) "
                              f"train on; model {cls.name!r} needs one set of images")
        updates: dict[str, Any] = {k: v for k, v in (("image_size", dataset.size), ("channels", dataset.channels))
                                   if hasattr(cfg, k)}
        if hasattr(cfg, "num_classes"):
            if cls.needs_labels and not dataset.labelled:
                raise ConfigError(f"model {cls.name!r} is class-conditional and needs labelled data; "
                                  f"{dataset.name!r} has no classes (use class subfolders)")
            updates["num_classes"] = len(dataset.classes)
        return dataclasses.replace(cfg, **updates)

    def ready(self, dataset, log=print) -> None:
        """Called on every run, new or resumed, before its first step: what the family's batches need
        attached to the dataset (a text network's caption embeddings, a latent model's latents)."""

    def prepare(self, dataset, steps: int | None = None) -> None:
        """Called once before the first training step of a new run (not on resume). `steps` is the run's
        own budget (train.steps), for a first stage that should scale with it; None: no budget given."""

    def check_labels(self, n: int, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The labels `sample` was given, checked: n class indices for a conditional family, else None."""
        if labels is None:
            if self.conditional:
                raise ConfigError(f"{self.name} is class-conditional: sample() needs labels")
            return None
        if not self.conditional:
            raise ConfigError(f"model {self.name!r} is not class-conditional: it takes no labels")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != n:
            raise ConfigError(f"got {labels.numel()} labels for {n} images")
        if labels.numel():
            low, high = labels.aminmax()    # one pass, not two: this runs for every sampled image
            if not (0 <= int(low) and int(high) < self.num_classes):
                raise ConfigError(f"label out of range: labels must be in 0..{self.num_classes - 1}")
        return labels.to(self.device)

    def check_inpaint(self, image: torch.Tensor, mask: torch.Tensor) -> None:
        """The arguments of an `inpaint`, checked: images N x C x H x W with the model's channels and a
        mask N x 1 x H x W (1 = generate)."""
        n, c, h, w = image.shape
        if c != self.cfg.channels:
            raise ConfigError(f"image has {c} channels, the model {self.cfg.channels}")
        if mask.shape != (n, 1, h, w):
            raise ConfigError(f"mask is {tuple(mask.shape[-2:])}, the image {h}x{w}: they must be the same size")

    grad_scaler = None   # set by the training loop under fp16 (torch.amp.GradScaler)

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), outside autocast, and scaled when the loop trains in fp16 (the optimizer's
        step unscales). Families call this instead of loss.backward()."""
        with torch.autocast(loss.device.type, enabled=False):
            (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def train_step(self, batch: dict[str, torch.Tensor], opt: dict, gen: torch.Generator) -> dict[str, float]:
        raise NotImplementedError

    def sample(self, n: int, *, labels: torch.Tensor | None = None, generator: Generators = None, **opts) -> torch.Tensor:
        raise NotImplementedError


def adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam as every family trains with it: the fused implementation, one pass over each tensor per
    step instead of about eight (a DCGAN generator's update on 2 AVX2 cores: 3.3 -> 0.5 ms)."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)


def _all_modules(module: nn.Module) -> list[nn.Module]:
    return cached_on(module, "_all_modules", lambda: list(module.modules()))


def _first_tensor(module: nn.Module) -> torch.Tensor:
    return cached_on(module, "_first_tensor", lambda: next(itertools.chain(module.parameters(), module.buffers())))


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Eval mode (batch norm uses its running statistics) for the duration, then the previous mode. A
    module already wholly in eval mode (a loaded run) is left alone: module.train() walks and sets every
    submodule, about 0.1 ms a call for a DCGAN, most of what one sampled image costs beyond its network."""
    if not any(m.training for m in _all_modules(module)):
        yield module
        return
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def per_item_normal(n: int, shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """n x *shape standard normal noise. With a list of n generators, item i comes from generator i only."""
    return _per_item(torch.randn, n, shape, generator, device)


def per_item_uniform(n: int, shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """n x *shape uniforms in [0, 1), drawn as per_item_normal draws its noise."""
    return _per_item(torch.rand, n, shape, generator, device)


def _per_item(draw, n: int, shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return draw((n, *shape), generator=generator, device=device)
    if len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for {n} images")
    if n == 1:   # one image (the page's case): the same numbers without the stack
        return draw((1, *shape), generator=generator[0], device=generator[0].device).to(device)
    return torch.stack([draw(shape, generator=g, device=g.device) for g in generator]).to(device)


# --- memory layout: networks trained channels-last (train.channels_last) keep one layout throughout ----
# An elementwise backward op whose two inputs have different layouts (one NCHW, one channels-last) runs
# unvectorised: 8x slower for a LeakyReLU backward on a 2-core AVX2 CPU. A flatten before a linear
# head, or a linear projection viewed as a feature map, is where a channels-last network would meet
# an NCHW tensor; these helpers keep that from happening. The math is unchanged: the flatten's numbers
# are the same, and a convolution reading a channels-last input rounds differently at most.

def flat_view(h: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A feature map h (N x C x H x W) as N x CHW rows, and each weight (rows x CHW, its columns in
    h.flatten(1)'s C-major order) with its columns in the same order as those rows: x @ w.T is then
    h.flatten(1) @ weight.T. A channels-last h is flattened in its memory order (H, W, C), as a view, and
    the weights' columns are permuted instead: a weight is far smaller than a batch of feature maps (one
    D head: 6272 numbers against a 3 MB map at batch 128), and the gradient comes back channels-last
    without a copy either."""
    if not is_channels_last(h):
        return (h.flatten(1), *weights)
    n, c, rows, cols = h.shape
    return (h.permute(0, 2, 3, 1).reshape(n, -1),
            *(w.view(-1, c, rows, cols).permute(0, 2, 3, 1).reshape(w.shape[0], -1) for w in weights))


class _FlattenKeepingLayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.channels_last = x.shape, is_channels_last(x)
        return x.flatten(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.reshape(ctx.shape)
        return grad.contiguous(memory_format=torch.channels_last) if ctx.channels_last else grad


class Flatten(nn.Module):
    """nn.Flatten (N x C x H x W -> N x CHW, C-major as usual) whose gradient comes back in the input's
    memory layout, so the backward ops before it see one layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FlattenKeepingLayout.apply(x)


def as_feature_map(x: torch.Tensor, channels: int, side: int, net: nn.Module) -> torch.Tensor:
    """N x (channels * side * side) -> N x channels x side x side, channels-last when the convolutions
    of `net` are (the model was moved to channels-last), so batch norm and its backward see one layout."""
    x = x.view(-1, channels, side, side)
    conv = next((p for p in net.parameters() if p.dim() == 4), None)
    return x.contiguous(memory_format=torch.channels_last) if conv is not None and is_channels_last(conv) else x
