"""imagegen: train, sample, evaluate and serve image-generative models.

The public API:

    ds = imagegen.load_data("fashion-mnist")                 # in-memory dataset, dict batches
    cfg = imagegen.resolve_config({"family": "dcgan", "train": {"steps": 2000}})
    run_dir = imagegen.train(cfg)                            # a self-describing run folder
    run = imagegen.load_run(run_dir)                         # model rebuilt from the folder alone
    images = imagegen.generate(run.model, seeds=range(16))   # 16 x C x H x W in [-1, 1]
    imagegen.use_engine(run.model, "onnxruntime")            # its network as one ONNX graph: cheap single images
    labels = imagegen.parse_labels("sneaker,bag", run.classes, 2)     # conditional families
    filled = imagegen.extend_image(run.model, image, mask, seed=0)  # diffusion inpainting
    more = imagegen.vary(run.model, 7, seeds=range(8), strength=0.4)  # "more like seed 7's image"
    kids = imagegen.breed(run.model, [3, 9], seeds=range(8), strength=0.5)  # variations of a blend
    report = imagegen.evaluate_run(run_dir, n=10_000)                 # metrics.json, stamped with its protocol
"""

from .version import __version__

from .runtime.host import warm_up_vector_math

warm_up_vector_math()   # before any other call into torch (runtime/host.py says why)

from .checkpoint import Run, build_model, load_run
from .data import DataConfig, ImageDataset, describe, load_data
from .runtime.engine import use_engine
from .evaluate.run_eval import evaluate_run
from .models import REGISTRY
from .report import write_report
from .sample import extend_image, generate, interpolate, interpolate_images, outpaint_canvas, parse_labels
from .train import RunConfig, TrainConfig, resolve_config, train
from .vary import breed, vary

__all__ = [
    "__version__", "DataConfig", "ImageDataset", "REGISTRY", "Run", "RunConfig", "TrainConfig", "breed", "build_model", "describe",
    "evaluate_run", "extend_image", "generate", "interpolate", "interpolate_images", "load_data", "load_run", "outpaint_canvas",
    "parse_labels", "resolve_config", "train", "use_engine", "vary", "write_report",
]
