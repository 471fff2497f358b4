"""`baton ckpt ls`, `show` and `verify` on a sharded checkpoint (several ranks' files, one manifest):
listed, shown with each file's rank, and a flipped byte in one rank's file named. In-process
(CliRunner), on a real store."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ckpt import CheckpointStore, Position
from flows.cli import app

POSITION = Position(epoch=0, batch_in_epoch=4, epoch_complete=False, step=4)


def baton(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}, terminal_width=200)


def sharded(tmp_path) -> CheckpointStore:
    store = CheckpointStore(str(tmp_path / "store"))
    parts = [store.write_part("run", "000000-0000000004", rank, {"data.distcp": bytes([rank]) * 5000})
             for rank in range(2)]
    store.commit_parts("run", POSITION, parts, metrics={"loss": 0.5})
    return store


def test_ls_and_show_list_a_sharded_checkpoint_with_each_files_rank(tmp_path):
    store = sharded(tmp_path)
    listed = baton("ckpt", "ls", store.url, "--verify")
    assert listed.exit_code == 0 and "000000-0000000004" in listed.output and "verified" in listed.output
    shown = baton("ckpt", "show", store.url, "run")
    body = json.loads(shown.stdout)
    assert shown.exit_code == 0 and body["verified"] is True and body["version"] == 4
    assert {name: entry["rank"] for name, entry in body["files"].items()} == {
        "rank-00000.data.distcp": 0, "rank-00001.data.distcp": 1}


def test_verify_names_the_damaged_file_of_one_rank(tmp_path):
    store = sharded(tmp_path)
    path = store.path("run", "000000-0000000004", "rank-00001.data.distcp")
    with open(path, "r+b") as handle:
        handle.seek(10)
        handle.write(b"\x07")
    checked = baton("ckpt", "verify", store.url)
    assert checked.exit_code == 1 and "run/000000-0000000004/rank-00001.data.distcp: blake3" in checked.output
