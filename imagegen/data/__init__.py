"""Data sources -> in-memory ImageDataset -> dict batches {"image": float NCHW in [-1, 1], "label": long}."""

from .dataset import ImageDataset
from .registry import DataConfig, describe, expand_path, expand_source, load_data

__all__ = ["DataConfig", "ImageDataset", "describe", "expand_path", "expand_source", "load_data"]
