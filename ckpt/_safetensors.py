"""The safetensors file format, written and read without copying tensor bytes.

`safetensors.torch.save` builds the whole file in one `bytes` object and `load` copies every tensor
out of it (twice); for checkpoints of gigabytes those copies cost as much as the disk. The format
itself is simple and fixed (an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes), so Baton writes it straight from tensor
memory and reads it into one buffer that the returned tensors share. The files are ordinary
safetensors files: the unit tests check both directions against the `safetensors` library.

Reading parses JSON and validates every byte range: no code runs, nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch

from ._blob import Blob
from .errors import CheckpointUndecodable, InvalidArgument

_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
_DTYPES = {name: dtype for dtype, name in _NAMES.items()}
_MAX_HEADER = 100 * 2**20  # as the safetensors library: a larger header is not a checkpoint


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy (the tensor must be contiguous and on the CPU)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Blob:
    """A safetensors file as a Blob of the header and the tensors' own memory.

    Tensors are laid out by element size (largest first), then name, as the safetensors library
    does, so every tensor starts at a multiple of its element size; the same tensors always give
    the same bytes."""
    prepared = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise InvalidArgument(f"tensor names must be strings, got {name!r}")
        tensor = tensor.detach()
        if tensor.dtype not in _NAMES:
            raise InvalidArgument(f"{name}: cannot store dtype {tensor.dtype} in safetensors "
                            f"(supported: {', '.join(sorted(_DTYPES))})")
        prepared[name] = tensor.cpu().contiguous()
    order = sorted(prepared, key=lambda n: (-prepared[n].element_size(), n))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    parts: list[Any] = []
    offset = 0
    for name in order:
        tensor = prepared[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        if nbytes:
            parts.append(_raw(tensor))
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)  # tensor data starts 8-byte aligned
    return Blob([struct.pack("<Q", len(encoded)), encoded, *parts])


def deserialize(buffer: bytearray | memoryview | bytes) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file held in `buffer`; they share its memory (no copy).

    A read-only buffer (`bytes`) is copied once first, since tensors must be writable."""
    view = memoryview(buffer).cast("B")
    if view.readonly:
        buffer = bytearray(view)
        view = memoryview(buffer)
    if len(view) < 8:
        raise CheckpointUndecodable(f"not a safetensors file: {len(view)} bytes, shorter than its header length")
    (length,) = struct.unpack_from("<Q", view, 0)
    if length > min(_MAX_HEADER, len(view) - 8):
        raise CheckpointUndecodable(f"not a safetensors file: header length {length} exceeds the file ({len(view)} bytes)")
    try:
        header = json.loads(bytes(view[8 : 8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointUndecodable(f"not a safetensors file: unreadable header ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointUndecodable("not a safetensors file: the header is not a JSON object")
    base, available = 8 + length, len(view) - 8 - length
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointUndecodable(f"safetensors header entry {name!r} is malformed or has an unsupported "
                             f"dtype: {info!r}") from err
        count = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= available or end - begin != count * itemsize:
            raise CheckpointUndecodable(f"safetensors tensor {name!r}: byte range [{begin}, {end}) does not fit "
                             f"shape {shape} of {info['dtype']} in {available} bytes of data")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(view, dtype=dtype, count=count, offset=base + begin).reshape(shape)
    return out
