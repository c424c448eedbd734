"""Sampling engines: what runs a family's sampling network. `torch` (the default) runs it as eager torch
operators; `onnxruntime` runs it as one ONNX graph in onnxruntime, which costs far less per operator,
so one image is nearly as cheap as its share of a batch.

Why an engine: in eager torch every convolution and product is one oneDNN call with a fixed cost of tens
of microseconds, which one image pays alone and a batch of 16 shares, so one image of a GAN, a VAE or the
distilled student costs 4-9x its share of a 16-image batch (docs/benchmarks/speed.md, "Sampling
engines"), however little Python runs around it. onnxruntime runs each convolution of one image as one
matrix product of its own, with little around it.

The promise holds under either engine: an image depends only on its seed, the weights and the engine.
`runtime/batching.run_fixed_batch` hands this engine the function it would call (the sampling network) and
checks what comes back as it checks torch: `exact_rows` finds the row counts that round each row as in a
full chunk, `wide_rows` the larger calls that do (onnxruntime computes each image of a convolution on its
own, so on machines A and B of docs/benchmarks every count passed and one image runs alone). The two
engines' images differ by float rounding (about 1e-6; the export check allows 1e-4), so the same seed
can differ by one level in a few pixels between them: the engine is part of the command that draws an
image (`--engine`).

Each function is exported once per input signature (`batching.check_key`: its code, the rows' shapes,
dtypes, threads...) with a dynamic batch dimension, checked against torch on a probe, and exported again after
any change to the weights (an optimizer step included). Exporting costs seconds (a DCGAN's generator
about 3 s, a U-Net more), so the engine is for a model that samples many times: `imagegen sample`,
`imagegen serve`, a benchmark; training's own grids use torch."""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ExportError
from ..export import TOLERANCE, onnx_proto, require_onnx
from ..nets.layers import optimizer_steps
from .batching import probe_rows

ENGINES = ("torch", "onnxruntime")
PROBE_ROWS = 3    # the rows a function is traced and checked on (not 1: the exporter would fix the batch at 1)


def check_engine(engine: str) -> str:
    """`engine`, if it is one of ENGINES and can run here (onnxruntime needs imagegen[export])."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "onnxruntime":
        require_onnx("--engine onnxruntime")
    return engine


def use_engine(model: nn.Module, engine: str) -> nn.Module:
    """Make `model` (a Family) sample with `engine` from now on; returns it."""
    if check_engine(engine) == "torch":
        model.__dict__.pop("engine", None)
        return model
    if model.device.type != "cpu":
        raise ConfigError(f"--engine onnxruntime runs on the CPU; this model is on {model.device} (use --engine torch)")
    model.__dict__["engine"] = OnnxEngine()
    return model


def engine_of(model: nn.Module) -> str:
    """The name of the engine `model` samples with."""
    engine = model.__dict__.get("engine")
    return "torch" if engine is None else engine.name


class OnnxEngine:
    """Graphs of a model's sampling functions in onnxruntime, made when first needed (`graph`)."""
    name = "onnxruntime"

    def __init__(self) -> None:
        self.graphs: dict[tuple, OnnxGraph] = {}

    def __deepcopy__(self, memo) -> OnnxEngine:
        # a copy of the model (export's, say) gets graphs of its own, made when needed: sessions don't copy
        return OnnxEngine()

    def graph(self, fn: Callable[..., torch.Tensor], xs: Sequence[torch.Tensor | None], owner: nn.Module,
              key: tuple) -> OnnxGraph:
        """The graph of fn for inputs shaped like xs (rows aside), up to date with owner's weights. The
        same object for the same key, so the rounding checks kept on owner stay with it."""
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = OnnxGraph(fn, [x is not None for x in xs], owner)
        g.refresh(xs)
        return g


class OnnxGraph:
    """fn(*xs) as an onnxruntime session: called like fn, with None where fn takes None."""

    def __init__(self, fn: Callable[..., torch.Tensor], present: list[bool], owner: nn.Module) -> None:
        self.fn, self.present, self.owner = fn, present, owner
        # The weights, listed once (walking the modules costs more than one image through onnxruntime): they
        # change in place (optimizer steps, EMA, load_state_dict) or by a data swap (module.to), not by new
        # tensors.
        self.tensors = list(itertools.chain(owner.parameters(), owner.buffers()))
        self.weights: tuple | None = None
        self.session = None

    def refresh(self, xs: Sequence[torch.Tensor | None]) -> None:
        """Export again where the weights changed since the last export (or there was none)."""
        weights = _weights_state(self.tensors)
        if weights != self.weights:
            self.session = self._export(xs)
            self.weights = weights

    def _export(self, xs: Sequence[torch.Tensor | None]):
        ort = require_onnx("--engine onnxruntime")
        probe = [x for x in probe_rows(xs, PROBE_ROWS) if x is not None]
        names = [f"x{i}" for i in range(len(probe))]
        batch = torch.export.Dim("N", min=1, max=65536)
        dynamic = (tuple({0: batch} for _ in probe),)   # one tuple: the *xs argument of _Present.forward
        module = _Present(self.fn, self.present, self.owner)
        try:
            proto = onnx_proto(module, tuple(probe), names, ["out"], dynamic)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.log_severity_level = 3          # its warnings of unused initialisers are not the user's
            session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as e:   # torch.export / onnxscript / onnxruntime failures: name the model, keep the cause
            raise ExportError(f"--engine onnxruntime: the {getattr(self.owner, 'name', 'model')} network could not "
                              f"be exported ({type(e).__name__}: {e}); use --engine torch") from e
        got = torch.from_numpy(session.run(None, _feeds(names, probe))[0])
        want = module(*probe)
        diff = float((got - want).abs().max())
        if not diff <= TOLERANCE:
            raise ExportError(f"--engine onnxruntime: the {getattr(self.owner, 'name', 'model')} network's outputs "
                              f"in onnxruntime differ from torch's by {diff:.3g} (tolerance {TOLERANCE:g}); "
                              f"use --engine torch")
        self.names = names
        return session

    def __call__(self, *xs: torch.Tensor | None) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, _feeds(self.names, [x for x in xs if x is not None]))[0])


class _Present(nn.Module):
    """fn taking only the inputs that are there (an ONNX graph has no None): the others go back in as
    None, where they were."""

    def __init__(self, fn: Callable[..., torch.Tensor], present: list[bool], owner: nn.Module) -> None:
        super().__init__()
        self.fn, self.present, self.owner = fn, present, owner

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        it = iter(xs)
        return self.fn(*[next(it) if p else None for p in self.present])


def _feeds(names: list[str], xs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    # onnxruntime reads C-ordered arrays: a channels-last map is copied to NCHW first (the engine runs on
    # the CPU only: use_engine)
    return {n: x.detach().contiguous().numpy() for n, x in zip(names, xs)}


def _weights_state(tensors: list[torch.Tensor]) -> tuple:
    """What tells that a weight changed: each tensor's version and data pointer, and the optimizer-step
    count (a fused optimizer changes weights without bumping their versions)."""
    return (optimizer_steps(),) + tuple((t._version, t.data_ptr()) for t in tensors)
