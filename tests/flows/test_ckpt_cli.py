"""`baton ckpt ls` and `baton ckpt show` flag a checkpoint whose files are damaged; a store whose
server cannot be reached is an error naming it. In-process (CliRunner), on real stores."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from typer.testing import CliRunner

from ckpt import CheckpointStore, Position, TrainingState, capture_rng, encode
from ckpt.state import META_FILE, MODEL_FILE, TENSORS_FILE
from flows.cli import app


def baton(*args: str, columns: int = 100, env: dict[str, str] | None = None):
    env = {"COLUMNS": str(columns), **(env or {})}
    return CliRunner().invoke(app, list(args), env=env, terminal_width=columns)


def _commit(store: CheckpointStore, lineage: str, epoch: int) -> str:
    torch.manual_seed(epoch)
    position = Position(epoch=epoch, batch_in_epoch=2, epoch_complete=True, step=2 * (epoch + 1))
    files = encode(TrainingState(model=torch.nn.Linear(4, 2).state_dict(), position=position, rng=[capture_rng()]))
    return store.commit(lineage, position, files, metrics={"loss": 1.0 / (epoch + 1)}).id


@pytest.fixture
def store(tmp_path) -> CheckpointStore:
    store = CheckpointStore(str(tmp_path / "s"))
    for epoch in range(3):
        _commit(store, "run", epoch)
    return store


def _file(store: CheckpointStore, ckpt_id: str, name: str):
    return store.root + f"/run/{ckpt_id}/{name}"


def _flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))


def test_ckpt_ls_marks_a_truncated_file_without_hashing_and_a_flipped_byte_with_verify(store):
    first, middle, last = [m.id for m in store.list("run")]
    with open(_file(store, last, TENSORS_FILE), "r+b") as f:
        f.truncate(10)
    _flip_a_byte(_file(store, middle, MODEL_FILE))

    cheap = baton("ckpt", "ls", store.url)
    assert cheap.exit_code == 0, cheap.output
    rows = {line.split()[1]: line for line in cheap.stdout.splitlines() if line.startswith("│ 0")}
    assert "DAMAGED" in rows[last] and "DAMAGED" not in rows[middle] and "DAMAGED" not in rows[first]
    assert f"damaged: run/{last}: {TENSORS_FILE}: size 10 bytes" in cheap.stderr.replace("\n", " ")
    as_json = {it["id"]: it for it in json.loads(baton("ckpt", "ls", store.url, "--json").stdout)}
    assert as_json[last]["problems"] and as_json[middle]["problems"] == [] and as_json[middle]["files"] == "sizes ok"

    hashed = {it["id"]: it for it in json.loads(baton("ckpt", "ls", store.url, "--json", "--verify").stdout)}
    assert [hashed[i]["files"] for i in (first, middle, last)] == ["verified", "DAMAGED", "DAMAGED"]
    assert "blake3" in hashed[middle]["problems"][0] and MODEL_FILE in hashed[middle]["problems"][0]
    table = baton("ckpt", "ls", store.url, "--verify")
    assert f"damaged: run/{middle}: {MODEL_FILE}" in table.stderr.replace("\n", " ")
    assert table.stdout.count("DAMAGED") == 2 and table.stdout.count("verified") == 1


def test_ckpt_ls_marks_a_missing_file_and_never_cuts_ids_with_the_extra_column(store):
    last = store.latest("run").id
    store.fs.rm_file(_file(store, last, META_FILE))
    out = baton("ckpt", "ls", store.url, columns=60)
    assert out.exit_code == 0, out.output
    assert "DAMAGED" in out.stdout and "…" not in out.stdout
    assert all(m.id in out.stdout for m in store.list("run"))
    assert f"{META_FILE}: missing" in out.stderr


def test_ckpt_show_verifies_the_checkpoint_it_shows_and_names_its_problems_and_the_good_one(store):
    first, middle, last = [m.id for m in store.list("run")]
    _flip_a_byte(_file(store, last, MODEL_FILE))
    out = baton("ckpt", "show", store.url, "run")
    assert out.exit_code == 0, out.output
    shown = json.loads(out.stdout)
    assert shown["id"] == last and shown["verified"] is False and MODEL_FILE in shown["problems"][0]
    err = out.stderr.replace("\n", " ")
    assert f"damaged: {MODEL_FILE}: blake3" in err
    assert f"(where training resumes): {middle}" in err

    whole = baton("ckpt", "show", store.url, "run", first)
    assert json.loads(whole.stdout)["verified"] is True and "damaged" not in whole.stderr
    quick = json.loads(baton("ckpt", "show", store.url, "run", "--no-verify").stdout)
    assert quick["verified"] is None and quick["problems"] == []


@pytest.mark.slow
def test_ckpt_commands_on_an_unreachable_s3_endpoint_fail_within_seconds_naming_it(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "baton-test", "AWS_SECRET_ACCESS_KEY": "baton-test"}
    out = baton("ckpt", "ls", "s3://bucket/store", env=env)
    assert out.exit_code == 2, out.output
    err = out.stderr.replace("\n", " ")
    assert f"cannot reach the S3 endpoint {endpoint}" in err and "endpoint_url" in err
    assert "Traceback" not in out.output
