"""DCP's checkpoint `Metadata`, and the non-tensor values of a state dict, as JSON: never a pickle.

torch.distributed.checkpoint pickles its `.metadata` file and `torch.load(weights_only=False)`s every
non-tensor value (an optimizer's lr, betas, ...): loading that runs code. Baton writes both as JSON
and reads them back through pydantic into DCP's own dataclasses (DESIGN invariant 6), so DCP's
planners can still reshard on load.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from .errors import CheckpointUndecodable, InvalidArgument

FORMAT = "baton-dcp"
_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_PICKLE_PROTOCOL = 0x80  # every pickle of protocol 2+ begins with this byte
_Dims = list[Annotated[int, Field(ge=0)]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Chunk(_Strict):
    offsets: _Dims
    sizes: _Dims


class TensorEntry(_Strict):
    type: Literal["tensor"] = "tensor"
    dtype: str = Field(description="torch dtype name, e.g. float32.")
    size: _Dims = Field(description="The full (global) tensor's shape.")
    chunks: list[Chunk] = Field(description="The pieces saved, each by one rank.")


class BytesEntry(_Strict):
    type: Literal["bytes"] = "bytes"


class Stored(_Strict):
    """Where one item (a tensor chunk or a value) lies: DCP's MetadataIndex -> _StorageInfo."""

    fqn: str
    offset: _Dims | None = Field(default=None, description="The chunk's offsets in the full tensor.")
    file: str = Field(description="Stored name of the file, in the checkpoint's folder.")
    at: int = Field(ge=0, description="Byte offset in the file.")
    length: int = Field(ge=0)


class DcpMetadata(_Strict):
    format: Literal["baton-dcp"] = FORMAT
    version: Literal[1] = 1
    dcp_version: str | None = None
    state: dict[str, Annotated[Union[TensorEntry, BytesEntry], Field(discriminator="type")]]
    storage: list[Stored]
    planner_data: dict[str, list[Union[StrictInt, StrictStr]]] | None = None
    modules: list[str] = Field(default_factory=list)


# ---- Metadata <-> JSON ---------------------------------------------------------------------
def encode_metadata(metadata: Metadata) -> bytes:
    state: dict[str, Any] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            state[fqn] = TensorEntry(dtype=str(entry.properties.dtype).removeprefix("torch."), size=list(entry.size),
                                     chunks=[Chunk(offsets=list(c.offsets), sizes=list(c.sizes)) for c in entry.chunks])
        else:
            state[fqn] = BytesEntry()
    storage = [Stored(fqn=index.fqn, offset=None if index.offset is None else list(index.offset),
                      file=info.relative_path, at=info.offset, length=info.length)
               for index, info in (metadata.storage_data or {}).items()]
    planner = metadata.planner_data
    doc = DcpMetadata(dcp_version=metadata.version, state=state, storage=storage,
                      planner_data={k: list(v) for k, v in planner.items()} if isinstance(planner, dict) else None,
                      modules=list(metadata.storage_meta.modules) if metadata.storage_meta else [])
    return doc.model_dump_json().encode()


def parse_metadata(raw: bytes | memoryview, where: str) -> DcpMetadata:
    """The validated JSON document; `CheckpointUndecodable` naming `where` for anything else (a
    planted pickle is recognised and never unpickled)."""
    data = bytes(raw)
    if data[:1] == bytes([_PICKLE_PROTOCOL]):
        raise CheckpointUndecodable(
            f"{where} is a pickle, not Baton's JSON DCP metadata: Baton never unpickles (loading a pickle "
            "runs code). Resume from an earlier checkpoint, or delete this one with `baton ckpt rm`")
    try:
        doc = DcpMetadata.model_validate_json(data)
    except ValidationError as err:
        raise CheckpointUndecodable(f"{where} is not Baton's JSON DCP metadata ({str(err)[:300]}); resume from an "
                                    "earlier checkpoint, or delete this one with `baton ckpt rm`") from err
    unknown = sorted({e.dtype for e in doc.state.values() if isinstance(e, TensorEntry)} - set(_DTYPES))
    if unknown:
        raise CheckpointUndecodable(f"{where} names dtypes this torch does not have: {', '.join(unknown)}")
    return doc


def to_dcp(doc: DcpMetadata) -> Metadata:
    """DCP's own `Metadata` dataclasses from the validated document."""
    state: dict[str, Any] = {}
    for fqn, entry in doc.state.items():
        if isinstance(entry, TensorEntry):
            state[fqn] = TensorStorageMetadata(
                properties=TensorProperties(dtype=_DTYPES[entry.dtype]), size=torch.Size(entry.size),
                chunks=[ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in entry.chunks])
        else:
            state[fqn] = BytesStorageMetadata()
    storage = {MetadataIndex(s.fqn, s.offset): _StorageInfo(s.file, s.at, s.length) for s in doc.storage}
    planner = {k: tuple(v) for k, v in doc.planner_data.items()} if doc.planner_data is not None else None
    return Metadata(state_dict_metadata=state, planner_data=planner, storage_data=storage,
                    storage_meta=StorageMeta(modules=list(doc.modules)), version=doc.dcp_version)


def dtype_of(name: str) -> torch.dtype:
    return _DTYPES[name]


# ---- non-tensor values <-> JSON ------------------------------------------------------------
# JSON has no tuples, no non-string keys and no sets: those travel tagged, so that an optimizer's
# `betas` comes back a tuple, as it went in.
def encode_value(value: Any, fqn: str) -> bytes:
    return json.dumps(_tagged(value, fqn), separators=(",", ":")).encode()


def decode_value(raw: bytes, fqn: str) -> Any:
    if raw[:1] == bytes([_PICKLE_PROTOCOL]):
        raise CheckpointUndecodable(f"the value of {fqn!r} is a pickle: Baton never unpickles; resume from an "
                                    "earlier checkpoint, or delete this one with `baton ckpt rm`")
    try:
        return _untagged(json.loads(raw))
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointUndecodable(f"the value of {fqn!r} is not Baton's JSON ({err})") from err


def _tagged(value: Any, fqn: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_tagged(v, fqn) for v in value]}
    if isinstance(value, list):
        return [_tagged(v, fqn) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _tagged(v, fqn) for k, v in value.items()}
        return {"__dict__": [[_tagged(k, fqn), _tagged(v, fqn)] for k, v in value.items()]}
    raise InvalidArgument(
        f"cannot save {fqn!r}, a {type(value).__name__}, in a sharded checkpoint: non-tensor values are "
        "stored as JSON (numbers, strings, bools, None, lists, tuples, dicts) so that loading never runs code")


def _untagged(value: Any) -> Any:
    if isinstance(value, list):
        return [_untagged(v) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tuple__"}:
        return tuple(_untagged(v) for v in value["__tuple__"])
    if set(value) == {"__dict__"}:
        return {_untagged(k): _untagged(v) for k, v in value["__dict__"]}
    if set(value) == {"__float__"}:
        return float(value["__float__"])  # 'inf', '-inf', 'nan' only: float() parses no code
    return {k: _untagged(v) for k, v in value.items()}
