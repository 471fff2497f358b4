"""The `baton` command line as a real process: validation before any work, and store commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt import CheckpointStore, Position, TrainingState, capture_rng, encode

BATON = str(Path(sys.executable).parent / "baton")


def baton(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BATON, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags, field, hint", [
    (["--epochs", "0"], "epochs", "greater than or equal to 1"),
    (["--workers", "0"], "workers", "greater than or equal to 1"),
    (["--lr", "-1"], "lr", "greater than 0"),
    (["--lineage", "../escape"], "lineage", "invalid lineage name"),
    (["--lineage", "/abs/path"], "lineage", "invalid lineage name"),
    (["--recipe", "no_such_module:thing"], "recipe", "cannot import module"),
    (["--recipe", "tasks.recipes:no_such_recipe"], "recipe", "has no attribute"),
    (["--recipe", "just-a-name"], "recipe", "module:attr"),
])
def test_an_invalid_train_flag_fails_naming_the_field_and_writes_nothing(tmp_path, flags, field, hint):
    out = baton("train", *flags, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{field}:" in out.stderr.replace("\n", " ") or f"{field}\x1b" in out.stderr, out.stderr
    assert hint in out.stderr.replace("\n", " ")
    assert list(tmp_path.iterdir()) == []  # no checkpoints folder, no Prefect or Ray files


def test_an_unknown_key_in_the_config_file_is_named(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 3\nepoch_per_block: 1\n")
    out = baton("train", "--config", "run.yaml", cwd=tmp_path)
    assert out.returncode == 2
    assert "epoch_per_block" in out.stderr and "Extra inputs are not permitted" in out.stderr


def test_flags_win_over_the_config_file_and_the_plan_splits_epochs_into_blocks(tmp_path):
    (tmp_path / "run.yaml").write_text("config:\n  epochs: 5\n  epochs_per_block: 4\n  lineage: from-file\n")
    out = baton("train", "--config", "run.yaml", "--epochs-per-block", "2", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["lineage"] == "from-file" and plan["config"]["epochs"] == 5
    assert [b["epochs"] for b in plan["blocks"]] == [[0, 1], [2, 3], [4, 4]]


def test_the_derived_lineage_is_stable_and_changes_with_the_hyper_parameters(tmp_path):
    def lineage(*flags):
        return json.loads(baton("train", "--dry-run", *flags, cwd=tmp_path).stdout)["lineage"]

    assert lineage() == lineage("--epochs", "9")  # more epochs continue the same lineage
    assert lineage() != lineage("--lr", "0.5")
    assert lineage().startswith("linear-")


def _commit_tiny(store: CheckpointStore, lineage: str, epoch: int) -> None:
    torch.manual_seed(epoch)
    model = torch.nn.Linear(4, 2)
    position = Position(epoch=epoch, batch_in_epoch=2, epoch_complete=True, step=2 * (epoch + 1))
    files = encode(TrainingState(model=model.state_dict(), position=position, rng=[capture_rng()]))
    store.commit(lineage, position, files, metrics={"loss": 1.0 / (epoch + 1)})


def test_ckpt_ls_lists_committed_checkpoints_as_json_and_verify_fails_listing_every_corrupted_file(tmp_path):
    store = CheckpointStore(str(tmp_path / "s"))
    for epoch in range(3):
        _commit_tiny(store, "run", epoch)
    items = json.loads(baton("ckpt", "ls", store.url, "--json", cwd=tmp_path).stdout)
    assert [i["epoch"] for i in items] == [0, 1, 2]
    assert {"lineage", "id", "epoch", "step", "uri", "metrics", "created_at", "digest"} <= set(items[0])
    assert baton("ckpt", "verify", store.url, cwd=tmp_path).returncode == 0

    first, last = items[0]["id"], items[2]["id"]
    model = tmp_path / "s" / "run" / first / "model.safetensors"
    data = bytearray(model.read_bytes()); data[-1] ^= 0xFF; model.write_bytes(bytes(data))
    (tmp_path / "s" / "run" / last / "state.json").write_text("{}")
    out = baton("ckpt", "verify", store.url, "--lineage", "run", cwd=tmp_path)
    assert out.returncode == 1
    assert f"run/{first}/model.safetensors" in out.stdout and f"run/{last}/state.json" in out.stdout


def test_ckpt_pin_show_and_rm_refuse_what_would_lose_a_pinned_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path / "s"))
    for epoch in range(2):
        _commit_tiny(store, "run", epoch)
    first = store.list("run")[0].id
    assert baton("ckpt", "pin", store.url, "run", first, "--alias", "production", cwd=tmp_path).returncode == 0
    shown = json.loads(baton("ckpt", "show", store.url, "run", "production", cwd=tmp_path).stdout)
    assert shown["id"] == first and shown["aliases"] == ["production"]
    best = json.loads(baton("ckpt", "show", store.url, "run", "best", cwd=tmp_path).stdout)
    assert best["epoch"] == 1  # lowest loss
    refused = baton("ckpt", "rm", store.url, "run", first, cwd=tmp_path)
    assert refused.returncode == 2 and "pinned as production" in refused.stderr
    assert baton("ckpt", "unpin", store.url, "run", "--alias", "production", cwd=tmp_path).returncode == 0
    assert baton("ckpt", "rm", store.url, "run", first, cwd=tmp_path).returncode == 0
    assert [m.epoch for m in store.list("run")] == [1]
    bad = baton("ckpt", "show", store.url, "../x", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid lineage name" in bad.stderr
