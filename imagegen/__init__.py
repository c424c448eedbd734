"""imagegen: train, sample, evaluate and serve image-generative models.

The public API:

    ds = imagegen.load_data("fashion-mnist")                 # in-memory dataset, dict batches
    cfg = imagegen.resolve_config({"family": "dcgan", "train": {"steps": 2000}})
    run_dir = imagegen.train(cfg)                            # a self-describing run folder
    run = imagegen.load_run(run_dir)                         # model rebuilt from the folder alone
    images = imagegen.generate(run.model, seeds=range(16))   # 16 x C x H x W in [-1, 1]
"""

__version__ = "0.1.0"

from .checkpoint import Run, build_model, load_run
from .data import DataConfig, ImageDataset, describe, load_data
from .models import REGISTRY
from .report import write_report
from .sample import generate, interpolate
from .train import RunConfig, TrainConfig, resolve_config, train

__all__ = [
    "DataConfig", "ImageDataset", "REGISTRY", "Run", "RunConfig", "TrainConfig", "build_model", "describe",
    "generate", "interpolate", "load_data", "load_run", "resolve_config", "train", "write_report",
]
