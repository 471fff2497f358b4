"""Export (ckpt/export.py, `baton ckpt export`): a checkpoint's model as one safetensors file that a
fresh, unwrapped model loads and then computes what the trained one did; for a sharded checkpoint
(consolidated from its chunks) and a single-writer one (its names stripped of `module.`). The export of
a 2-rank FSDP2 checkpoint is in test_dcp.py, next to the fixture that saves it (one run of the ranks)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_state_dict

import ckpt.dcp
from ckpt import CheckpointUndecodable, InvalidArgument, Position, TrainingState, encode
from ckpt.export import DTYPES, export_safetensors, unwrapped_name

from . import _ranks

POSITION = Position(epoch=2, batch_in_epoch=0, epoch_complete=True, step=6)
INPUT = torch.randn(5, _ranks.WIDTH, generator=torch.Generator().manual_seed(4))


def trained():
    model = _ranks.make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _ranks.train(model, optimizer)
    return model, optimizer


def outputs_of(path: str) -> torch.Tensor:
    fresh = _ranks.make_model(9)
    fresh.load_state_dict(load_file(path))
    return fresh(INPUT)


def test_a_sharded_checkpoint_exports_to_a_file_a_fresh_model_loads_with_the_same_outputs(store, tmp_path):
    model, optimizer = trained()
    msd, osd = get_state_dict(model, optimizer)
    manifest = ckpt.dcp.save(store, "run", POSITION, {"model": msd, "optim": osd})
    target = str(tmp_path / "model.safetensors")
    assert export_safetensors(store, manifest, target)["tensors"] == 4
    assert torch.equal(outputs_of(target), model(INPUT))


def test_a_single_writer_checkpoint_of_a_wrapped_model_exports_with_unwrapped_names(store, tmp_path):
    model, optimizer = trained()
    wrapped = {f"module.{name}": tensor for name, tensor in model.state_dict().items()}  # as DDP names them
    files = encode(TrainingState(model=wrapped, position=POSITION, optimizer=optimizer.state_dict()))
    manifest = store.commit("run", POSITION, files)
    target = str(tmp_path / "model.safetensors")
    export_safetensors(store, manifest, target)
    assert sorted(load_file(target)) == sorted(model.state_dict())
    assert torch.equal(outputs_of(target), model(INPUT))


def test_an_unknown_dtype_or_prefix_is_refused_naming_the_choices(store, tmp_path):
    model, optimizer = trained()
    manifest = ckpt.dcp.save(store, "run", POSITION, dict(zip(("model", "optim"), get_state_dict(model, optimizer))))
    with pytest.raises(InvalidArgument, match="fp32, fp16, bf16"):
        export_safetensors(store, manifest, str(tmp_path / "x"), dtype="int3")
    with pytest.raises(CheckpointUndecodable, match="prefix"):
        export_safetensors(store, manifest, str(tmp_path / "x"), prefix="net.")


def test_the_commands_dtype_choices_are_the_librarys():
    from flows.ckpt_export import DTYPE_NAMES

    assert DTYPE_NAMES == tuple(DTYPES)


def test_wrapper_segments_are_dropped_from_names_wherever_they_are():
    assert unwrapped_name("module._orig_mod.layers.0._fsdp_wrapped_module.weight") == "layers.0.weight"
    assert unwrapped_name("modules.0.weight") == "modules.0.weight"

