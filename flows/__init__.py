"""Prefect flows (`train`, and the configuration models) and the `baton` command line."""

from .config import TrainConfig

__all__ = ["TrainConfig"]
