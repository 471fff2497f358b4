"""Prefect flows (`train`, `cleanup`), their configuration models and the `baton` command line."""

from importlib import import_module

__all__ = ["TrainConfig", "train"]
_WHERE = {"TrainConfig": "flows.config", "train": "flows.train"}


def __getattr__(name: str):
    # Lazy, so that `baton ckpt ...` does not pay for importing Prefect and Ray.
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(name)
