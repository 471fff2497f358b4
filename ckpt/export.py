"""Export a checkpoint's model weights as one safetensors file, for serving or another framework.

Sharded checkpoints (ckpt/dcp.py) are consolidated here from their chunks, as DCP's metadata places
them; single-writer ones are read from their model file. Names are the unwrapped module's: the state
dict's prefix (`model.` in `ckpt.dcp.save({"model": ..., "optim": ...})`) and wrapper segments
(`module.` of DDP, `_orig_mod.` of torch.compile, `_fsdp_wrapped_module.` of FSDP1) are dropped, so
`model.load_state_dict(safetensors.torch.load_file(path))` works on a fresh, unwrapped model.
"""

from __future__ import annotations

import math
import os

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ._io import _write_temp
from ._safetensors import deserialize, serialize
from .dcp import is_sharded, read_metadata
from .errors import CheckpointUndecodable, InvalidArgument
from .manifest import Manifest
from .state import MODEL_FILE

__all__ = ["DTYPES", "export_safetensors", "model_tensors", "unwrapped_name"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WRAPPERS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrapped_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in WRAPPERS)


def model_tensors(store, manifest: Manifest, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The model's full tensors by unwrapped name, every file verified as it is read."""
    if is_sharded(manifest):
        tensors = _consolidated(store, manifest, prefix)
    elif MODEL_FILE in manifest.files:
        tensors = deserialize(store.read(manifest, MODEL_FILE))
    else:
        raise CheckpointUndecodable(f"{manifest.lineage}/{manifest.id} holds neither a sharded state nor {MODEL_FILE}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        clean = unwrapped_name(name)
        if clean in out:
            raise CheckpointUndecodable(f"two tensors are named {clean!r} once wrapper prefixes are removed")
        out[clean] = tensor
    return out


def _consolidated(store, manifest: Manifest, prefix: str) -> dict[str, torch.Tensor]:
    metadata = read_metadata(store, manifest)
    tensors = {fqn[len(prefix):]: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
               for fqn, entry in metadata.state_dict_metadata.items()
               if fqn.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
    if not tensors:
        raise CheckpointUndecodable(f"{manifest.lineage}/{manifest.id} has no tensor named {prefix}...: pass the "
                                    "prefix of the model's state dict (prefix=...)")
    by_file: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        if index.fqn[len(prefix):] in tensors and index.fqn.startswith(prefix):
            by_file.setdefault(info.relative_path, []).append((index, info))
    for name, pieces in sorted(by_file.items()):  # one file in memory at a time
        data = store.read(manifest, name)
        for index, info in pieces:
            target = tensors[index.fqn[len(prefix):]]
            region = target
            sizes = _chunk_sizes(metadata, index)
            for dim, (start, size) in enumerate(zip(index.offset or (), sizes)):
                region = region.narrow(dim, start, size)
            count = math.prod(sizes)
            if count:
                region.copy_(torch.frombuffer(data, dtype=target.dtype, count=count,
                                              offset=info.offset).reshape(sizes))
    return tensors


def _chunk_sizes(metadata, index) -> list[int]:
    for chunk in metadata.state_dict_metadata[index.fqn].chunks:
        if tuple(chunk.offsets) == tuple(index.offset or ()):
            return list(chunk.sizes)
    raise CheckpointUndecodable(f"{index.fqn}: no chunk at {list(index.offset or ())} in the metadata")


def export_safetensors(store, manifest: Manifest, path: str, *, dtype: str | None = None,
                       prefix: str = "model.") -> dict[str, int]:
    """Write the model's full weights to `path` (a local file, replaced atomically); floating-point
    tensors are cast to `dtype` (fp32, fp16, bf16) if given. Returns {"tensors": n, "bytes": size}."""
    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgument(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tensors = model_tensors(store, manifest, prefix)
    if dtype is not None:
        tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
    blob = serialize(tensors, metadata={"format": "pt", "baton_checkpoint": f"{manifest.lineage}/{manifest.id}"})
    path = os.path.abspath(os.path.expanduser(path))
    temp = _write_temp(os.path.dirname(path), path, bytes(blob))
    os.replace(temp, path)
    return {"tensors": len(tensors), "bytes": blob.size}
