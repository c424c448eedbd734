"""Export a run's sampling network to ONNX, for deployment outside imagegen (onnxruntime, TensorRT,
onnxruntime-web...), checked against torch before the file is kept.

What each family exports (N is a dynamic batch dimension; images are N x C x S x S floats in [-1, 1]):

- dcgan / cgan: the generator, `z` (N x z_dim, standard normal) [+ `label` int64 N] -> `image`.
- vae / cvae: the decoder's mean, `z` (N x z_dim) [+ `label`] -> `image`.
- ddpm: one network call, `x` (N x C x S x S) and `time` (int64 N, 0..T-1) [+ `label`] -> `out`, the predicted
  noise (prediction "eps") or v (prediction "v"). The sampler (DDIM) runs outside the graph on the schedule
  stored in the model's metadata (`imagegen.alphas_cumprod`).
- flow: one network call, `x` and `time` (float N in [0, 1]: 0 noise, 1 data) [+ `label`] -> `velocity`;
  Euler from z: x += v(x, t) / K for t = 0, 1/K, ... (the run's solver and steps are in the metadata).
- distilled: the whole sampler, its K Euler steps unrolled: `z` (N x C x S x S) [+ `label`] -> `image`.
- cyclegan: one generator, `image` of one domain -> `translated`, the other's (--direction).

Labels of conditional diffusion/flow networks take the null class (num_classes) for the unconditional
branch: classifier-free guidance is out_null + g (out_cond - out_null), two calls. Text networks take
`text_pooled` (N x 384), `text_tokens` (N x T x 384) and `text_mask` (bool N x T) from all-MiniLM-L6-v2;
`imagegen/text.py` makes them. The random-pixel baseline has no network and is refused.

The exporter is torch.onnx's (torch.export based; onnxscript writes the graph). The file is written
beside its destination, run by onnxruntime on random inputs of batch 3 and compared with torch, and only
renamed into place when every output is within the tolerance (1e-4).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .version import __version__
from .checkpoint import Run
from .errors import ConfigError, ExportError, ImagegenError
from .models.base import ExportSpec

TOLERANCE = 1e-4
CHECK_BATCH = 3
TOKENS = 16   # token slots of the text inputs in the check (the graph takes any number)


@dataclass
class Graph:
    """What to export: the module, its named example inputs (batch CHECK_BATCH), its output names and
    the metadata that tells a user how to drive it."""
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    usage: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Exported:
    path: Path
    inputs: dict[str, tuple]      # name -> (dtype, shape with "N" for the batch)
    outputs: dict[str, tuple]
    max_abs_diff: float           # onnxruntime vs torch on the check inputs
    usage: str


# --- the graphs -------------------------------------------------------------------------------------


class _Call(nn.Module):
    """A module whose forward is fn(*inputs): export sees only tensors in and out."""

    def __init__(self, owner: nn.Module, fn) -> None:
        super().__init__()
        self.owner, self.fn = owner, fn

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fn(*xs)


def _random_inputs(model, spec: ExportSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Example inputs of batch CHECK_BATCH, drawn from `gen`: what a user would feed, in range."""
    cfg, n = model.cfg, CHECK_BATCH
    image = (cfg.channels, cfg.image_size, cfg.image_size)
    out = {}
    for name in spec.inputs:
        if name == "z" and model.has_latent:
            out[name] = torch.randn(n, cfg.z_dim, generator=gen)
        elif name in ("z", "x", "image"):
            out[name] = torch.randn(n, *image, generator=gen).clamp(-3, 3)
        elif name == "label":   # diffusion/flow networks also take the null class
            k = model.num_classes + (1 if model.has_null_class else 0)
            out[name] = torch.randint(k, (n,), generator=gen)
        elif name == "time" and spec.time_steps:
            out[name] = torch.randint(spec.time_steps, (n,), generator=gen)
        elif name == "time":
            out[name] = torch.rand(n, generator=gen)
        elif name == "text_pooled":
            out[name] = torch.randn(n, cfg.text_dim, generator=gen) * 0.05
        elif name == "text_tokens":
            out[name] = torch.randn(n, TOKENS, cfg.text_dim, generator=gen) * 0.05
        elif name == "text_mask":   # the first 1..TOKENS slots hold words
            lengths = torch.randint(1, TOKENS + 1, (n,), generator=gen)
            out[name] = torch.arange(TOKENS)[None] < lengths[:, None]
        else:
            raise AssertionError(name)
    return out


def graph_for(run: Run, direction: str = "a2b") -> Graph:
    """The exportable graph of a run's model: the family's ExportSpec (Family.export_spec), its example
    inputs, and the metadata that names the run."""
    model = run.model
    spec = model.export_spec(direction)
    meta = {"imagegen.family": run.family, "imagegen.version": __version__, "imagegen.run": run.path.name,
            "imagegen.step": str(run.step), "imagegen.model_config": json.dumps(run.config["model"]),
            "imagegen.classes": json.dumps(run.classes), **spec.metadata}
    gen = torch.Generator().manual_seed(0)
    return Graph(_Call(model, spec.fn), _random_inputs(model, spec, gen), spec.outputs, spec.usage, meta)


# --- export and check --------------------------------------------------------------------------------


def export_onnx(run: Run, out: str | Path, *, direction: str = "a2b", tolerance: float = TOLERANCE,
                opset: int | None = None) -> Exported:
    """Write the run's sampling network to `out` (ONNX), after checking it in onnxruntime against torch.
    The run's own model is left as it was: the graph is traced from a copy in plain NCHW memory (runs
    load channels-last, whose kernels round differently, so converting theirs would change `sample`)."""
    ort = require_onnx("export")
    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: an ONNX file name ends in .onnx")
    model = copy.deepcopy(run.model).to(memory_format=torch.contiguous_format)
    graph = graph_for(dataclasses.replace(run, model=model), direction)
    names = list(graph.inputs)
    args = tuple(graph.inputs.values())
    batch = torch.export.Dim("N", min=1, max=4096)
    tokens = torch.export.Dim("T", min=1, max=512)
    dynamic = (tuple({0: batch, 1: tokens} if n in ("text_tokens", "text_mask") else {0: batch} for n in names),)
    # (one tuple: the *xs argument of _Call.forward)
    graph.module.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        proto = onnx_proto(graph.module, args, names, graph.outputs, dynamic, opset)
        for key, value in graph.metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        entry = proto.metadata_props.add()
        entry.key, entry.value = "imagegen.usage", graph.usage
        partial.write_bytes(proto.SerializeToString())
        diff, session = check_onnx(partial, graph, ort)
        if not diff <= tolerance:
            raise ExportError(f"{out}: onnxruntime's outputs differ from torch's by {diff:.3g} (tolerance {tolerance:g})")
        os.replace(partial, out)
    except ImagegenError:
        raise
    except Exception as e:   # torch.export / onnxscript failures: name the model, keep the cause
        raise ExportError(f"{run.path}: ONNX export of the {run.family} network failed: {e}") from e
    finally:
        partial.unlink(missing_ok=True)
    shape = lambda a: tuple(d if isinstance(d, int) else str(d) for d in a.shape)   # noqa: E731
    inputs = {a.name: (a.type, shape(a)) for a in session.get_inputs()}
    outputs = {a.name: (a.type, shape(a)) for a in session.get_outputs()}
    return Exported(out, inputs, outputs, diff, graph.usage)


def require_onnx(what: str):
    """The onnxruntime module, or an ExportError that names what `what` needs: torch.onnx's exporter
    writes a graph with onnxscript (and onnx), and onnxruntime runs it."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"{what} needs {', '.join(missing)}: pip install 'imagegen[export]'")
    import onnxruntime
    return onnxruntime


def onnx_proto(module: nn.Module, args: tuple, names: list[str], outputs: list[str], dynamic: tuple,
               opset: int | None = None):
    """module(*args) as an ONNX ModelProto (torch.onnx's exporter, torch.export based), with the named
    inputs and outputs and the dynamic dimensions `dynamic` (torch.export's dynamic_shapes).

    Traced with autograd on (no parameter needs a gradient): outside autograd nets/layers.Linear takes
    products that round a row alike wherever it sits; the graph holds the plain product. Quiet: the
    exporter's progress lines, and its note that torchvision's operators are not there."""
    with torch.enable_grad(), contextlib.redirect_stdout(io.StringIO()), _quiet("torch.onnx"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.export's own deprecation notes, not the user's concern
        program = torch.onnx.export(module, args, input_names=names, output_names=outputs,
                                    dynamic_shapes=dynamic, dynamo=True, opset_version=opset,
                                    external_data=False, verbose=False)
    return program.model_proto


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def check_onnx(path: Path, graph: Graph, ort):
    """(the largest absolute difference between onnxruntime's outputs and torch's on the graph's inputs,
    the onnxruntime session)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in graph.inputs.items()}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = graph.module(*graph.inputs.values())
    want = want if isinstance(want, (tuple, list)) else [want]
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want)), session
