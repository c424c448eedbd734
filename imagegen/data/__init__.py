"""Data sources -> in-memory ImageDataset -> dict batches {"image": float NCHW in [-1, 1], "label": long}."""

from .dataset import ImageDataset
from .locate import expand_path, expand_source
from .registry import DataConfig, describe, load_data

__all__ = ["DataConfig", "ImageDataset", "describe", "expand_path", "expand_source", "load_data"]
