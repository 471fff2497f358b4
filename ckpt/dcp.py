"""torch.distributed.checkpoint (DCP) over Baton's store: sharded state saved by every rank into one
checkpoint, committed once, and loaded back on any number of ranks (DCP's planners reshard).

    manifest = ckpt.dcp.save(store, lineage, position, {"model": msd, "optim": osd},
                             before_commit=fence_check)         # every rank; the manifest on rank 0
    ckpt.dcp.load(store, manifest, state_dict)                  # every rank, any world size, in place

Each rank writes the items DCP plans for it (its shards; replicated tensors are spread over the ranks
by DCP's dedup of save plans) into its part: its shards into `rank-0000R.data.distcp`, the items that
every rank loads whole (replicated tensors such as Adam's `step`, non-tensor values) into
`rank-0000R.replicated.distcp`, so that a verified load on the same world size reads and hashes its
own shards and the small shared file, not another rank's shards. Raw tensor bytes (no torch.save),
values as JSON, hashed while written (`CheckpointStore.write_part`). The parts reach
rank 0 through DCP's own gather of write results; rank 0 writes DCP's metadata as JSON
(`rank-00000.dcp-metadata.json`, ckpt/_dcp_metadata.py) and commits every part with one manifest.
Loading unpickles nothing: DCP's default reader unpickles its `.metadata` and `torch.load`s non-tensor
values with `weights_only=False`; these planners and this reader do neither.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ._blob import Blob
from ._dcp_metadata import decode_value, dtype_of, encode_metadata, encode_value, parse_metadata, to_dcp
from ._safetensors import _raw
from .errors import CheckpointError, CheckpointUndecodable, InvalidArgument
from .manifest import Manifest, Position
from .names import checkpoint_id
from .sharded import Part, logical_name, parts_digest, rank_files

__all__ = ["DATA_FILE", "METADATA_FILE", "REPLICATED_FILE", "LoadPlanner", "SavePlanner", "StoreReader", "StoreWriter",
           "is_sharded", "load", "read_metadata", "save"]

DATA_FILE = "data.distcp"  # this rank's shards
REPLICATED_FILE = "replicated.distcp"  # what it holds that every rank loads whole
METADATA_FILE = "dcp-metadata.json"
_PART_FQN = "__baton_part__"  # the write result that carries a rank's Part to rank 0
_ALIGN = 64  # each item starts at a multiple: tensors built on the read buffer are aligned


class SavePlanner(DefaultSavePlanner):
    """DCP's default save planner (dedup of replicated tensors included), with non-tensor values
    encoded as JSON instead of torch.save's pickle."""

    def transform_object(self, write_item: WriteItem, object: Any):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(encode_value(object, write_item.index.fqn))
        return object


class LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner (resharding included), with non-tensor values decoded from JSON
    instead of `torch.load(weights_only=False)`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        decoded = decode_value(value.getvalue(), fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], decoded)
        else:
            self.state_dict[fqn] = decoded


class StoreWriter(StorageWriter):
    """A DCP storage writer into one checkpoint of a Baton store. Built alike on every rank;
    `files` are this rank's own extra files (its RNG or loader state), written into its part.
    The commit arguments (`metrics`, `fence`, `before_commit`, ...) are rank 0's: see
    `CheckpointStore.commit_parts`. After `dcp.save`, rank 0's `manifest` is the committed one."""

    def __init__(self, store, lineage: str, position: Position, *, files: Mapping[str, Any] | None = None,
                 **commit: Any) -> None:
        super().__init__()
        self.store, self.lineage, self.position = store, lineage, position
        self.ckpt_id = checkpoint_id(position.epoch, position.step)
        self.files = dict(files or {})
        if {DATA_FILE, REPLICATED_FILE, METADATA_FILE} & set(self.files):
            raise InvalidArgument(f"{DATA_FILE}, {REPLICATED_FILE} and {METADATA_FILE} are the names of DCP's own "
                                  "files in a part: give this rank's own files other names")
        self.commit = commit
        self.rank = 0
        self.manifest: Manifest | None = None

    def reset(self, checkpoint_id=None) -> None:
        self.manifest = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank") or 0
        if not kwargs.get("use_collectives", True):
            raise InvalidArgument("a Baton checkpoint is committed by rank 0 once every rank wrote its part: "
                                  "save with use_collectives=True (the default)")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner) -> Future[list[WriteResult]]:
        if not isinstance(planner, SavePlanner):
            raise InvalidArgument("save with planner=ckpt.dcp.SavePlanner() (or ckpt.dcp.save): DCP's default "
                                  "planner pickles non-tensor values, and Baton's checkpoints hold no pickle")
        files, laid_out = dict(self.files), {}
        for name in (DATA_FILE, REPLICATED_FILE):
            items = [item for item in plan.items if _is_shard(item) == (name == DATA_FILE)]
            if items:
                files[name], laid_out[name] = _lay_out(items, planner)
        part = self.store.write_part(self.lineage, self.ckpt_id, self.rank, files)
        stored = {logical_name(n)[1]: n for n in part.files if logical_name(n)[1] in laid_out}  # type: ignore[index]
        results = [WriteResult(index=item.index, size_in_bytes=length,
                               storage_data=_StorageInfo(stored[name], offset, length))
                   for name, placed in laid_out.items() for item, offset, length in placed]
        results.append(WriteResult(index=MetadataIndex(f"{_PART_FQN}{self.rank}"), size_in_bytes=0, storage_data=part))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        parts, storage = [], {}
        for result in (r for rank_results in results for r in rank_results):
            if isinstance(result.storage_data, Part):
                parts.append(result.storage_data)
            else:
                storage[result.index] = result.storage_data
        metadata.storage_data = storage
        metadata.version = "1.0.0"
        # The digest is of the data: the metadata names the files, whose names differ between a first
        # save and a re-run into a committed folder (sharded.py), for the same state.
        commit = {"digest": parts_digest({n: e for p in parts for n, e in p.files.items()}), **self.commit}
        parts.append(self.store.write_part(self.lineage, self.ckpt_id, self.rank,
                                           {METADATA_FILE: encode_metadata(metadata)}))
        self.manifest = self.store.commit_parts(self.lineage, self.position, parts,
                                                load_problems=lambda existing: _metadata_problems(self.store, existing),
                                                **commit)

    def storage_meta(self):
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False


def _is_shard(item: WriteItem) -> bool:
    """A piece of a tensor (an FSDP2 shard), as opposed to a whole tensor or a value: every rank that
    loads it whole on the same world size needs the latter, but only its owner the former."""
    data = item.tensor_data
    return data is not None and tuple(data.chunk.sizes) != tuple(data.size)


def _lay_out(items: list[WriteItem], planner: SavePlanner) -> tuple[Blob, list[tuple[WriteItem, int, int]]]:
    """This rank's items end to end in one file, each at a 64-byte boundary: (the file, [(item,
    offset, length)]). Tensors are not copied (a shard that is not contiguous is, once)."""
    parts: list[Any] = []
    placed = []
    offset = 0
    for item in items:
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            view = memoryview(data.getbuffer())
        else:
            tensor = data.detach().cpu().contiguous()
            view = _raw(tensor) if tensor.numel() else memoryview(b"")
        pad = -offset % _ALIGN
        if pad:
            parts.append(bytes(pad))
            offset += pad
        if len(view):
            parts.append(view)
        placed.append((item, offset, len(view)))
        offset += len(view)
    return Blob(parts), placed


class StoreReader(StorageReader):
    """A DCP storage reader of one committed checkpoint. With `verify` (the default), every file a
    rank reads is read whole and checked against its size and BLAKE3; without it (for a caller that
    verified the checkpoint before, as `latest_verified` does), a rank reads only the byte ranges of
    the items it loads, which is what resharding onto more ranks wants."""

    def __init__(self, store, manifest: Manifest, verify: bool = True) -> None:
        super().__init__()
        self.store, self.manifest, self.verify = store, manifest, verify
        self._metadata: Metadata | None = None
        self._layout: dict[tuple[str, tuple], tuple[torch.dtype, torch.Size]] = {}

    def reset(self, checkpoint_id=None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointUndecodable("Baton's sharded checkpoints have one global metadata file, no per-rank ones")
        if self._metadata is None:
            self._metadata = read_metadata(self.store, self.manifest)
        return self._metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._metadata = metadata
        for fqn, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, TensorStorageMetadata):
                for chunk in entry.chunks:
                    self._layout[(fqn, tuple(chunk.offsets))] = (entry.properties.dtype, chunk.sizes)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner) -> Future[None]:
        if not isinstance(planner, LoadPlanner):
            raise InvalidArgument("load with planner=ckpt.dcp.LoadPlanner() (or ckpt.dcp.load): DCP's default planner "
                                  "runs torch.load(weights_only=False) on non-tensor values, which can run code")
        storage = self._metadata.storage_data  # type: ignore[union-attr]
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(storage[item.storage_index].relative_path, []).append(item)
        for name, items in by_file.items():  # one file in memory at a time
            for item, view in self._views(name, [storage[i.storage_index] for i in items], items):
                self._load_item(item, view, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _views(self, name: str, infos: list[_StorageInfo], items: list) -> list[tuple[Any, memoryview]]:
        if self.verify:
            whole = self.store.read(self.manifest, name)
            return [(item, whole[info.offset : info.offset + info.length]) for item, info in zip(items, infos)]
        path = self.store.path(self.manifest.lineage, self.manifest.id, name)
        with self.store.fs.open(path, "rb") as handle:
            out = []
            for item, info in zip(items, infos):
                handle.seek(info.offset)
                out.append((item, memoryview(bytearray(handle.read(info.length)))))
        return out

    def _load_item(self, item, view: memoryview, planner: LoadPlanner) -> None:
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(bytes(view)))
            return
        index = item.storage_index
        dtype, sizes = self._layout[(index.fqn, tuple(index.offset or ()))]
        count = math.prod(sizes)
        if len(view) != count * torch.empty((), dtype=dtype).element_size():
            raise CheckpointUndecodable(f"{self.manifest.lineage}/{self.manifest.id}: {index.fqn} at {list(index.offset or ())} "
                                        f"holds {len(view)} bytes, not {count} values of {dtype}")
        stored = torch.frombuffer(view, dtype=dtype, count=count).reshape(sizes) if count else torch.empty(sizes, dtype=dtype)
        source = narrow_tensor_by_index(stored, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != source.size():
            raise CheckpointUndecodable(f"{index.fqn}: the checkpoint's piece is {list(source.size())}, "
                                        f"the state dict's {list(target.size())}")
        target.copy_(source)
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False


# ---- the calls a training loop makes -------------------------------------------------------
def is_sharded(manifest: Manifest) -> bool:
    """Whether `manifest` is a checkpoint saved by `save` (DCP metadata in rank 0's part)."""
    return METADATA_FILE in rank_files(manifest).get(0, {})


def read_metadata(store, manifest: Manifest) -> Metadata:
    """DCP's `Metadata` of a sharded checkpoint, verified and decoded from JSON (never unpickled)."""
    name = rank_files(manifest).get(0, {}).get(METADATA_FILE)
    if name is None:
        raise CheckpointUndecodable(f"{manifest.lineage}/{manifest.id} is not a sharded checkpoint (no {METADATA_FILE} "
                                    "in rank 0's part); load it with ckpt.decode")
    where = f"{manifest.lineage}/{manifest.id}/{name}"
    return to_dcp(_checked(parse_metadata(store.read(manifest, name), where), manifest, where))


def _checked(doc, manifest: Manifest, where: str):
    for stored in doc.storage:
        entry = manifest.files.get(stored.file)
        if entry is None or stored.at + stored.length > entry.size:
            raise CheckpointUndecodable(f"{where}: {stored.fqn} lies outside the checkpoint's files "
                                        f"({stored.file}, bytes {stored.at}-{stored.at + stored.length})")
    return doc


def _metadata_problems(store, manifest: Manifest) -> list[str]:
    """`commit_parts`' check of an already committed checkpoint: its DCP metadata must decode."""
    try:
        read_metadata(store, manifest)
    except CheckpointError as err:
        return [f"does not load: {err}"]
    return []


def save(store, lineage: str, position: Position, state_dict: dict[str, Any], *,
         files: Mapping[str, Any] | None = None, process_group=None, **commit: Any) -> Manifest | None:
    """Save `state_dict` (as from `torch.distributed.checkpoint.state_dict.get_state_dict`) from every
    rank of the process group (or from this process alone, without one) into one checkpoint. Returns
    the committed manifest on rank 0, None on the others; a failure on any rank raises on every rank,
    as its own error (`LeaseLost`, ...). `commit`: `CheckpointStore.commit_parts`' keyword arguments."""
    writer = StoreWriter(store, lineage, position, files=files, **commit)
    _unwrapped(lambda: dcp.save(state_dict, storage_writer=writer, planner=SavePlanner(), process_group=process_group,
                              no_dist=_alone()))
    return writer.manifest


def load(store, manifest: Manifest, state_dict: dict[str, Any], *, verify: bool = True, process_group=None) -> None:
    """Load a sharded checkpoint into `state_dict` in place (DTensors, plain tensors, values) on every
    rank, whatever the number of ranks that saved it; then `set_state_dict(model, optimizer, ...)`."""
    reader = StoreReader(store, manifest, verify=verify)
    reader.read_metadata()  # a bad checkpoint raises its own error here, on every rank (and it is read once)
    _unwrapped(lambda: dcp.load(state_dict, storage_reader=reader, planner=LoadPlanner(), process_group=process_group,
                              no_dist=_alone()))


def _alone() -> bool:
    """No process group: this process saves or loads the whole state by itself."""
    return not (dist.is_available() and dist.is_initialized())


def _unwrapped(call: Callable[[], Any]) -> Any:
    """DCP wraps a failure of any rank into a CheckpointException on every rank: raise the first
    rank's own error instead (a `LeaseLost` stays a `LeaseLost`)."""
    try:
        with warnings.catch_warnings():
            # Saving without a process group is what `_alone` asked for, not a surprise to warn about.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return call()
    except CheckpointException as wrapped:
        for _, (error, _trace) in sorted(wrapped.failures.items()):
            if isinstance(error, (CheckpointError, OSError, ValueError, TypeError, RuntimeError)):
                raise error from wrapped
        raise
