"""Baton's zero-copy safetensors writer/reader and the hashes of checkpoint files (BLAKE3; the
chunked and whole-file sha256 of older manifests still verify)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import struct

import blake3
import pytest
import safetensors.torch
import torch

from ckpt import CheckpointExists, CheckpointStore, Position, TrainingState, decode, encode
from ckpt import _io
from ckpt._blob import Blob, chunked_sha256
from ckpt._safetensors import deserialize, serialize
from ckpt.manifest import MANIFEST_NAME, FileEntry
from ckpt.state import MODEL_FILE
from ckpt.store import _encode_manifest


def every_dtype() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=gen)
    return {
        "f64": base.double(), "f32": base, "f16": base.half(), "bf16": base.bfloat16(),
        "i64": (base * 100).long(), "i32": (base * 100).int(), "i16": (base * 100).short(),
        "i8": (base * 10).to(torch.int8), "u8": (base.abs() * 10).to(torch.uint8), "bool": base > 0,
        "f8e4m3": base.to(torch.float8_e4m3fn), "f8e5m2": base.to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4), "slice": base[1:],  # a view with an offset
    }


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bytes (bitwise, so that NaNs and float8 compare too)."""
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and _bytes(a[k]) == _bytes(b[k]) for k in a)


def test_files_written_by_baton_load_with_the_safetensors_library_and_back():
    tensors = every_dtype()
    data = bytes(serialize(tensors))
    assert same(safetensors.torch.load(data), tensors)
    assert same(deserialize(bytearray(data)), tensors)


def test_files_written_by_the_safetensors_library_load_with_baton():
    tensors = every_dtype()
    data = safetensors.torch.save({k: v.clone() for k, v in tensors.items()}, metadata={"k": "v"})
    assert same(deserialize(bytearray(data)), tensors)


def test_serialisation_is_canonical_and_aligned():
    tensors = every_dtype()
    shuffled = dict(reversed(list(tensors.items())))
    data = bytes(serialize(tensors))
    assert data == bytes(serialize(shuffled))  # the same tensors give the same bytes
    (length,) = struct.unpack("<Q", data[:8])
    assert (8 + length) % 8 == 0
    header = json.loads(data[8 : 8 + length])
    for name, info in header.items():
        begin = info["data_offsets"][0]
        assert begin % tensors[name].element_size() == 0, name


def test_decoded_tensors_share_the_buffer_that_was_read():
    tensors = {"w": torch.randn(256, 256)}
    buffer = bytearray(bytes(serialize(tensors)))
    loaded = deserialize(buffer)["w"]
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    assert address <= loaded.data_ptr() < address + len(buffer)  # no copy
    assert torch.equal(loaded, tensors["w"])


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:4], "shorter than its header length"),
    (lambda d: struct.pack("<Q", 10**9) + d[8:], "exceeds the file"),
    (lambda d: d[:8] + b"[" + d[9:], "unreadable header|not a JSON object"),
    (lambda d: d.replace(b'"F32"', b'"X99"'), "unsupported dtype"),
    (lambda d: d.replace(b'"data_offsets":[0,', b'"data_offsets":[4,'), "does not fit"),
    (lambda d: d[:-4], "does not fit"),
])
def test_a_malformed_safetensors_file_is_refused_with_a_reason(damage, message):
    data = bytes(serialize({"w": torch.ones(4, 4)}))
    with pytest.raises(ValueError, match=message):
        deserialize(bytearray(damage(data)))


def test_the_chunked_sha256_is_the_sha256_of_the_chunks_sha256s():
    data = bytes(range(256)) * 1000  # 256,000 bytes
    size = 65_536
    expected = hashlib.sha256(b"".join(hashlib.sha256(data[i : i + size]).digest()
                                       for i in range(0, len(data), size))).hexdigest()
    assert chunked_sha256(data, size) == expected
    # The same however the bytes are split into parts.
    parts = Blob([data[:10], data[10:70_000], data[70_000:]])
    assert parts.sha256(size) == expected
    assert chunked_sha256(b"", size) == hashlib.sha256(hashlib.sha256(b"").digest()).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 8 * 2**20, 8 * 2**20 + 1, 20 * 2**20 + 3])
def test_writing_reading_and_verifying_agree_on_the_blake3_of_the_file(tmp_path, size):
    data = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
    blob = Blob([data[: size // 3], data[size // 3 :]])
    fs, root, _ = _io.open_filesystem(str(tmp_path))
    entry = _io.write_file(fs, f"{root}/f", blob)
    assert entry.size == size and entry.kind == "blake3" and entry.sha256 is None and entry.chunk_size is None
    assert entry.blake3 == blake3.blake3(data).hexdigest() == blob.hash()
    read, digest = _io.read_hashed(fs, f"{root}/f", entry)
    assert read == data and digest == entry.blake3
    assert _io.hash_file(fs, f"{root}/f", entry) == (size, entry.blake3)
    assert "sha256" not in entry.model_dump() and "chunk_size" not in entry.model_dump()


@pytest.mark.parametrize("size", [0, 8 * 2**20 + 1])
def test_a_schema_2_file_with_a_chunked_sha256_still_reads_and_verifies(tmp_path, size):
    data = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
    fs, root, _ = _io.open_filesystem(str(tmp_path))
    _io.write_file(fs, f"{root}/f", data)
    entry = FileEntry(size=size, sha256=chunked_sha256(data), chunk_size=_io.CHUNK)
    assert entry.kind == "chunked sha256"
    read, digest = _io.read_hashed(fs, f"{root}/f", entry)
    assert read == data and digest == entry.sha256
    assert _io.hash_file(fs, f"{root}/f", entry) == (size, entry.sha256)


@pytest.mark.parametrize("fields", [{}, {"blake3": "a" * 64, "sha256": "b" * 64},
                                    {"blake3": "a" * 64, "chunk_size": 2**20}])
def test_a_file_entry_has_exactly_one_hash(fields):
    with pytest.raises(ValueError, match="exactly one of blake3 and sha256|chunk_size goes with"):
        FileEntry(size=1, **fields)


def test_a_checkpoint_of_manifest_schema_1_whole_file_sha256_still_verifies_and_loads(tmp_path):
    store = CheckpointStore(str(tmp_path))
    position = Position(epoch=0, batch_in_epoch=0, epoch_complete=True, step=3)
    model = torch.nn.Linear(4, 2).state_dict()
    manifest = store.commit("run", position, encode(TrainingState(model=model, position=position)))
    folder = store.path("run", manifest.id)
    entries = {name: FileEntry(size=e.size, sha256=hashlib.sha256(store.fs.cat_file(f"{folder}/{name}")).hexdigest())
               for name, e in manifest.files.items()}
    old = manifest.model_copy(update={"version": 1, "files": entries})
    _io.write_atomic(store.fs, f"{folder}/{MANIFEST_NAME}", _encode_manifest(old))
    again = store.manifest("run", manifest.id)
    assert again.version == 1 and all(e.chunk_size is None for e in again.files.values())
    assert store.verify(again) == []
    state = decode({name: store.read(again, name) for name in again.files})
    assert same(state.model, model)
    # ...and a flipped byte is still caught under the old rule.
    path = f"{folder}/model.safetensors"
    raw = bytearray(store.fs.cat_file(path))
    raw[len(raw) // 2] ^= 1
    store.fs.pipe_file(path, bytes(raw))
    assert store.verify(again) and "sha256" in store.verify(again)[0]


def test_a_schema_2_checkpoint_verifies_loads_and_a_recommit_of_its_weights_keeps_it(tmp_path):
    """Upgrading Baton mid-lineage: a checkpoint written with chunked sha256 (schema 2) still
    verifies and loads, and committing the same weights at its id again (a retried block) keeps it
    instead of calling them other weights."""
    store = CheckpointStore(str(tmp_path))
    position = Position(epoch=0, batch_in_epoch=0, epoch_complete=True, step=3)
    model = torch.nn.Linear(4, 2).state_dict()
    files = encode(TrainingState(model=model, position=position))
    manifest = store.commit("run", position, files)
    folder = store.path("run", manifest.id)
    entries = {name: FileEntry(size=e.size, sha256=chunked_sha256(store.fs.cat_file(f"{folder}/{name}")),
                               chunk_size=_io.CHUNK) for name, e in manifest.files.items()}
    old = manifest.model_copy(update={"version": 2, "files": entries, "digest": files[MODEL_FILE].sha256()})
    _io.write_atomic(store.fs, f"{folder}/{MANIFEST_NAME}", _encode_manifest(old))
    again = store.manifest("run", manifest.id)
    assert again.version == 2 and store.verify(again) == []
    assert same(decode({name: store.read(again, name) for name in again.files}).model, model)
    kept = store.commit("run", position, encode(TrainingState(model=model, position=position)))
    assert kept == again  # not rewritten, not refused
    other = {k: v + 1 for k, v in model.items()}
    with pytest.raises(CheckpointExists):
        store.commit("run", position, encode(TrainingState(model=other, position=position)))


def test_a_blob_changed_after_it_was_hashed_is_hashed_again_when_written(tmp_path):
    tensor = torch.zeros(1000)
    blob = serialize({"w": tensor})
    before = blob.hash()
    tensor.add_(1.0)  # a Blob is a view: training changed the bytes since
    fs, root, _ = _io.open_filesystem(str(tmp_path))
    entry = _io.write_file(fs, f"{root}/f", blob)
    assert entry.blake3 != before
    assert _io.hash_file(fs, f"{root}/f", entry) == (entry.size, entry.blake3)


def test_a_forked_process_hashes_after_its_parent_did():
    """BLAKE3's own thread pool does not survive fork(): a forked writer or DataLoader worker that
    hashed with it hung (found by the S3 crash test). Baton hashes on one thread or its own pool."""
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from ckpt._blob import Blob, blake3_hex\n"
            "from ckpt import _io\n"
            "data = os.urandom(64 << 20)\n"
            "expected = blake3_hex(data)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os._exit(0 if blake3_hex(data) == expected and Blob([data]).hash() == expected else 1)\n"
            "_, status = os.waitpid(pid, 0)\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
