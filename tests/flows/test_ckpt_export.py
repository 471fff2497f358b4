"""`baton ckpt export`: a lineage's checkpoint by selector, as one safetensors file, cast on request;
an unknown selector is a one-line error (exit 2). In-process (CliRunner), on a real store."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_state_dict
from typer.testing import CliRunner

import ckpt.dcp
from ckpt import CheckpointStore
from flows.cli import app
from tests.ckpt.test_export import POSITION, trained


def test_the_command_exports_a_lineages_checkpoint_cast_to_bf16(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    model, optimizer = trained()
    msd, osd = get_state_dict(model, optimizer)
    ckpt.dcp.save(store, "run", POSITION, {"model": msd, "optim": osd})
    target = tmp_path / "bf16.safetensors"
    result = CliRunner().invoke(app, ["ckpt", "export", store.url, "run@latest", "--to", str(target), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert "4 tensors" in result.output
    exported = load_file(str(target))
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    assert torch.equal(exported["0.weight"], model.state_dict()["0.weight"].to(torch.bfloat16))

    missing = CliRunner().invoke(app, ["ckpt", "export", store.url, "run@nope", "--to", str(target)])
    assert missing.exit_code == 2 and "no alias 'nope'" in missing.output
