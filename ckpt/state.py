"""What a checkpoint holds, and its on-disk format: safetensors for tensors, JSON for the rest.

Nothing here unpickles: loading a checkpoint runs no code (DESIGN invariant 6).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ._blob import Blob
from ._safetensors import deserialize, serialize
from .errors import CheckpointError, CheckpointUndecodable, InvalidArgument
from .manifest import Position

MODEL_FILE = "model.safetensors"
TENSORS_FILE = "train_state.safetensors"
META_FILE = "state.json"
FORMAT_VERSION = 1


@dataclass
class RankRNG:
    """The random number generator states of one rank."""

    python: Any
    numpy: Any
    torch: torch.Tensor
    cuda: list[torch.Tensor] = field(default_factory=list)


@dataclass
class TrainingState:
    """Everything needed to continue training exactly where it stopped."""

    model: dict[str, torch.Tensor]
    position: Position
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: list[RankRNG] = field(default_factory=list)
    progress: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> RankRNG:
    np_state = np.random.get_state(legacy=True)
    return RankRNG(
        python=_jsonable(random.getstate()),
        numpy=[np_state[0], np_state[1].tolist(), *[_jsonable(v) for v in np_state[2:]]],
        torch=torch.get_rng_state(),
        cuda=list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    )


def restore_rng(state: RankRNG) -> None:
    version, internal, gauss = state.python
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state.numpy
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state.torch)
    if state.cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda)


def model_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Fingerprint of model weights, equal iff names, dtypes, shapes and bytes are: the BLAKE3 of
    their safetensors file, so a committed checkpoint's digest costs no extra pass."""
    return serialize(tensors).hash()


class EncodedState(dict):
    """{file name: Blob}, ready for `CheckpointStore.commit`; the Blobs share the state's memory.

    `digest` is the model digest: the model file's BLAKE3, which `commit` computes while writing
    the file (reading it here first hashes it)."""

    @property
    def digest(self) -> str:
        return self[MODEL_FILE].hash()

    def same_weights_as(self, manifest) -> bool:
        """Whether these are the weights of `manifest`, a checkpoint of an older schema whose digest
        is not a BLAKE3: compare the model file the way its manifest hashed it."""
        entry, blob = manifest.files.get(MODEL_FILE), self[MODEL_FILE]
        if entry is None or entry.size != blob.size:
            return False
        if entry.kind == "blake3":
            return entry.blake3 == blob.hash()
        return entry.sha256 == (blob.sha256(entry.chunk_size) if entry.chunk_size else hashlib.sha256(bytes(blob)).hexdigest())

    @staticmethod
    def load_problems(read: Callable[[str], Any]) -> list[str]:
        """Why files of this format, read by name with `read`, cannot be loaded (empty if they
        can). `CheckpointStore.commit` asks it before keeping an already committed checkpoint
        whose hashes match: a planted pickle or a torch zip hashes fine and still does not load."""
        try:
            decode({name: read(name) for name in (META_FILE, TENSORS_FILE, MODEL_FILE)})
        except CheckpointError as err:
            return [f"does not decode: {err}"]
        return []


def encode(state: TrainingState) -> EncodedState:
    """Lay the state out as checkpoint files, without copying tensor bytes."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": FORMAT_VERSION, "position": state.position.model_dump(),
                            "progress": _jsonable(state.progress),
                            "scheduler": _split(state.scheduler, "scheduler", tensors)}
    if state.optimizer is not None:
        meta["optimizer"] = _split(state.optimizer, "optimizer", tensors)
    meta["extra"] = _split(state.extra, "extra", tensors)
    meta["rng"] = []
    for rank, rng in enumerate(state.rng):
        tensors[f"rng/{rank}/torch"] = rng.torch
        for device, cuda_state in enumerate(rng.cuda):
            tensors[f"rng/{rank}/cuda/{device}"] = cuda_state
        meta["rng"].append({"python": rng.python, "numpy": rng.numpy, "cuda_devices": len(rng.cuda)})
    return EncodedState({
        MODEL_FILE: serialize(state.model),
        TENSORS_FILE: serialize(tensors),
        META_FILE: Blob([json.dumps(meta, sort_keys=True).encode()]),
    })


def decode(files: dict[str, Any]) -> TrainingState:
    """The state from its files (writable buffers as `CheckpointStore.read` returns them, bytes or
    Blobs). Tensors share the buffers' memory: nothing is copied, nothing is unpickled.

    Files that are not a state of this format (whatever they hold: their hashes may match their
    manifest) raise `CheckpointUndecodable`, so a caller can skip to an earlier checkpoint."""
    files = {name: bytearray(bytes(data)) if isinstance(data, Blob) else data for name, data in files.items()}
    try:
        return _decode(files)
    except CheckpointUndecodable:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        # Not JSON, JSON of another shape, a tensor or key it names that is missing.
        raise CheckpointUndecodable(
            f"checkpoint files are not a training state of format {FORMAT_VERSION} "
            f"({err.__class__.__name__}: {str(err)[:200]}); resume from an earlier checkpoint, "
            "or delete this one with `baton ckpt rm`") from err


def _decode(files: dict[str, Any]) -> TrainingState:
    for name in (META_FILE, TENSORS_FILE, MODEL_FILE):
        if name not in files:
            raise CheckpointUndecodable(f"checkpoint has no {name}: not a training state")
    meta = json.loads(bytes(files[META_FILE]))
    if not isinstance(meta, dict):
        raise CheckpointUndecodable(f"{META_FILE} holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointUndecodable(f"unknown checkpoint state format {meta.get('format')!r}; "
                                    "upgrade Baton to load it")
    tensors = deserialize(files[TENSORS_FILE])
    rng = []
    for rank, entry in enumerate(meta["rng"]):
        cuda = [tensors[f"rng/{rank}/cuda/{d}"] for d in range(entry["cuda_devices"])]
        rng.append(RankRNG(entry["python"], entry["numpy"], tensors[f"rng/{rank}/torch"], cuda))
    optimizer = _join(meta["optimizer"], tensors) if "optimizer" in meta else None
    if optimizer is not None:
        optimizer["state"] = {int(k): v for k, v in optimizer["state"].items()}
    return TrainingState(
        model=deserialize(files[MODEL_FILE]),
        position=Position.model_validate(meta["position"]),
        optimizer=optimizer,
        scheduler=_join(meta.get("scheduler"), tensors),
        rng=rng,
        progress=meta.get("progress", {}),
        extra=_join(meta.get("extra", {}), tensors),
    )


def _split(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors out of a nested structure into `tensors`, leaving JSON references."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{prefix}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(value)]
    return _jsonable(value)


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InvalidArgument(
        f"cannot store a {type(value).__name__} in a checkpoint: only tensors and JSON values "
        "(numbers, strings, lists, dicts) are saved, so that loading never runs code"
    )
