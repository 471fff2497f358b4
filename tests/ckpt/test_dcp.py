"""torch.distributed.checkpoint over Baton's store (ckpt/dcp.py): state saved by DCP's planners into
one committed checkpoint, its metadata and values as JSON, loaded back without unpickling; FSDP2 and
DDP on real gloo ranks, resharded onto 1 and 3 ranks (slow)."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import ckpt.dcp
from ckpt import CheckpointCorrupted, CheckpointStore, CheckpointUndecodable, InvalidArgument, LeaseLost, Position
from ckpt._dcp_metadata import decode_value, encode_value
from ckpt.manifest import MANIFEST_NAME, FileEntry, encode_manifest
from ckpt._blob import blake3_hex

from . import _ranks
from .test_store import write_raw

POSITION = Position(epoch=0, batch_in_epoch=2, epoch_complete=False, step=2)
METADATA = "rank-00000.dcp-metadata.json"


def trained(seed: int = 0):
    model = _ranks.make_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _ranks.train(model, optimizer)
    return model, optimizer


def saved(store, model, optimizer, **kwargs):
    msd, osd = get_state_dict(model, optimizer)
    return ckpt.dcp.save(store, "run", POSITION, {"model": msd, "optim": osd}, **kwargs)


def loaded(store, manifest, **kwargs):
    model = _ranks.make_model(3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    state = dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
    ckpt.dcp.load(store, manifest, state, **kwargs)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return model, optimizer


class Planted:
    """A pickle that would leave a file behind if anything unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant_pickle(store: CheckpointStore, manifest, marker: str) -> None:
    """Replace the DCP metadata by a pickle and rewrite the manifest to match it: every hash verifies."""
    evil = pickle.dumps(Planted(marker))
    write_raw(store, store.path("run", manifest.id, METADATA), evil)
    files = {**manifest.files, METADATA: FileEntry(size=len(evil), blake3=blake3_hex(evil), rank=0)}
    write_raw(store, store.path("run", manifest.id, MANIFEST_NAME), encode_manifest(manifest.model_copy(update={"files": files})))


# ---- one process ---------------------------------------------------------------------------
def test_model_and_optimizer_saved_through_dcp_load_back_equal_with_their_value_types(store):
    model, optimizer = trained()
    manifest = saved(store, model, optimizer, files={"rng.json": b'{"seed": 1}'}, metrics={"loss": 0.25})
    assert ckpt.dcp.is_sharded(manifest) and store.verify(manifest) == [] and manifest.metrics == {"loss": 0.25}
    # One process: every tensor is whole, so all lie in the file every rank would load.
    assert set(manifest.files) == {"rank-00000.replicated.distcp", METADATA, "rank-00000.rng.json"}

    again, again_opt = loaded(store, manifest)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    saved_state, loaded_state = optimizer.state_dict(), again_opt.state_dict()
    assert loaded_state["param_groups"] == saved_state["param_groups"]
    assert isinstance(loaded_state["param_groups"][0]["betas"], tuple)
    for key, value in saved_state["state"][0].items():
        assert torch.equal(loaded_state["state"][0][key], value), key


def test_the_dcp_metadata_is_json_and_a_planted_pickle_in_its_place_is_refused_never_unpickled(store, tmp_path):
    manifest = saved(store, *trained())
    assert bytes(store.read(manifest, METADATA)).startswith(b'{"format":"baton-dcp"')
    marker = str(tmp_path / "the-pickle-ran")
    plant_pickle(store, manifest, marker)
    planted = store.manifest("run", manifest.id)
    assert store.verify(planted) == []  # hashes match: only the format can tell
    with pytest.raises(CheckpointUndecodable, match="is a pickle.*never unpickles"):
        loaded(store, planted)
    assert not os.path.exists(marker)


def test_a_changed_metadata_file_fails_verification_and_json_of_another_shape_is_undecodable(store):
    manifest = saved(store, *trained())
    write_raw(store, store.path("run", manifest.id, METADATA), b'{"format": "baton-dcp", "state": 3}')
    with pytest.raises(CheckpointCorrupted, match="dcp-metadata.json"):
        loaded(store, manifest)
    with pytest.raises(CheckpointUndecodable, match="not Baton's JSON DCP metadata"):
        ckpt.dcp.read_metadata(store, manifest.model_copy(update={"files": {
            **manifest.files, METADATA: FileEntry(size=35, blake3=blake3_hex(b'{"format": "baton-dcp", "state": 3}'), rank=0)}}))


def test_the_next_save_of_a_checkpoint_whose_metadata_is_a_planted_pickle_replaces_it(store, tmp_path):
    model, optimizer = trained()
    manifest = saved(store, model, optimizer)
    plant_pickle(store, manifest, str(tmp_path / "ran"))
    repaired = saved(store, model, optimizer)
    assert repaired.created_at > manifest.created_at and store.verify(repaired) == []
    loaded(store, repaired)


def test_saving_the_same_state_again_returns_the_committed_checkpoint(store):
    model, optimizer = trained()
    first = saved(store, model, optimizer)
    assert saved(store, model, optimizer) == first
    assert set(p.rsplit("/", 1)[-1] for p in store.fs.find(store.path("run", first.id))) == set(first.files) | {MANIFEST_NAME}


def test_a_save_whose_fence_check_fails_raises_lease_lost_and_commits_nothing(store):
    def taken_over():
        raise LeaseLost("refusing to commit: the lease was taken over")

    with pytest.raises(LeaseLost, match="taken over"):
        saved(store, *trained(), before_commit=taken_over)
    assert store.list("run") == []


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcps_own_planners_which_pickle_are_refused_by_baton_s_writer_and_reader(store):
    model, optimizer = trained()
    manifest = saved(store, model, optimizer)
    state = dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
    writer = ckpt.dcp.StoreWriter(store, "run", Position(epoch=3, batch_in_epoch=0, epoch_complete=True, step=9))
    with pytest.raises(CheckpointException, match="planner=ckpt.dcp.SavePlanner"):  # DCP wraps it
        dcp.save(state, storage_writer=writer, no_dist=True)
    with pytest.raises(CheckpointException, match="planner=ckpt.dcp.LoadPlanner"):
        dcp.load(state, storage_reader=ckpt.dcp.StoreReader(store, manifest), no_dist=True)


@pytest.mark.parametrize("value", [(0.9, 0.999), {1: "a", "b": [None, True]}, math.inf, [(), {}], "x", -3])
def test_non_tensor_values_round_trip_through_json_with_their_types(value):
    assert decode_value(encode_value(value, "v"), "v") == value
    assert type(decode_value(encode_value(value, "v"), "v")) is type(value)


def test_a_value_json_cannot_hold_is_refused_when_saving_naming_it():
    with pytest.raises(InvalidArgument, match="'optim.x', a device"):
        encode_value(torch.device("cpu"), "optim.x")


# ---- real ranks (gloo) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    url = str(root / "store")
    _ranks.run_ranks(2, _ranks.fsdp_save_then_load, url, str(root))
    return CheckpointStore(url), str(root)


@pytest.mark.slow
def test_an_fsdp2_checkpoint_lists_both_ranks_files_and_loads_bit_identical_on_2_ranks(fsdp_checkpoint):
    store, _ = fsdp_checkpoint  # the ranks compared their shards after the load
    manifest = store.latest("run")
    data = {name: entry for name, entry in manifest.files.items() if name.endswith(".data.distcp")}
    assert {entry.rank for entry in data.values()} == {0, 1} and store.verify(manifest) == []
    assert {n for n, e in manifest.files.items() if n.endswith("rng.json")} == {"rank-00000.rng.json", "rank-00001.rng.json"}
    metadata = ckpt.dcp.read_metadata(store, manifest)
    tensors = {fqn for fqn, e in metadata.state_dict_metadata.items() if isinstance(e, TensorStorageMetadata)}
    whole = sum(math.prod(metadata.state_dict_metadata[fqn].size) * 4 for fqn in tensors)
    written = {name: 0 for name in data}  # tensor bytes in each file (its items lie 64-byte aligned)
    for index, info in metadata.storage_data.items():
        if index.fqn in tensors:
            written[info.relative_path] = written.get(info.relative_path, 0) + info.length
    assert sum(written.values()) == whole, written  # every piece once
    assert all(0 < written[name] < 0.7 * whole for name in data), written  # no rank wrote the whole state
    # Adam's `step` (a whole tensor on every rank) and the param groups' values lie apart from the shards.
    shared = {name for name in manifest.files if name.endswith(".replicated.distcp")}
    assert len(shared) == 1 and all(info.relative_path in shared for index, info in metadata.storage_data.items()
                                    if index.fqn not in tensors or index.fqn.endswith(".step"))


@pytest.mark.slow
def test_an_fsdp2_checkpoint_exports_whole_to_a_fresh_unwrapped_model_with_the_same_outputs(fsdp_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from ckpt.export import export_safetensors

    store, root = fsdp_checkpoint
    target = str(tmp_path / "model.safetensors")
    export_safetensors(store, store.latest("run"), target)
    full = {k.removeprefix("model."): v for k, v in load_file(f"{root}/full.safetensors").items() if k.startswith("model.")}
    exported = load_file(target)  # consolidated from both ranks' shards, under the unwrapped module's names
    assert exported.keys() == full.keys() and all(torch.equal(exported[k], full[k]) for k in full)
    trained = _ranks.make_model(9)  # the trained weights, gathered whole by the ranks before the save
    trained.load_state_dict(full)
    fresh = _ranks.make_model(8)
    fresh.load_state_dict(load_file(target))
    batch = torch.randn(5, _ranks.WIDTH, generator=torch.Generator().manual_seed(4))
    assert torch.equal(fresh(batch), trained(batch))


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_an_fsdp2_checkpoint_of_2_ranks_loads_resharded_on_another_number_of_ranks(fsdp_checkpoint, world):
    store, root = fsdp_checkpoint
    _ranks.run_ranks(world, _ranks.fsdp_load_resharded, store.url, root)


@pytest.mark.slow
def test_ddp_replicated_state_is_written_once_with_each_rank_writing_about_half(tmp_path):
    url = str(tmp_path / "store")
    _ranks.run_ranks(2, _ranks.ddp_save_then_load, url, str(tmp_path))
    manifest = CheckpointStore(url).latest("ddp")
    sizes = [e.size for n, e in sorted(manifest.files.items()) if n.endswith(".replicated.distcp")]  # all whole
    assert len(sizes) == 2 and min(sizes) / max(sizes) > 0.8
    state_bytes = 2 * 8 * (32 * 32 + 32) * 4  # weights and momentum, once
    assert state_bytes <= sum(sizes) < 1.2 * state_bytes


def test_a_rank_file_named_like_dcps_own_files_is_refused(store):
    with pytest.raises(InvalidArgument, match="give this rank's own files other names"):
        saved(store, *trained(), files={ckpt.dcp.DATA_FILE: b"mine"})
