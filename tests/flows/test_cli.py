"""The `baton` command line: validation before any work, help texts, and the store commands.

Commands run in-process (typer's CliRunner), as a user would type them; one test runs the real
`baton` executable to check what `baton ckpt` imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt import CheckpointStore, Position, TrainingState, capture_rng, encode
from flows.cli import app

BATON = str(Path(sys.executable).parent / "baton")


def baton(*args: str, columns: int = 80, env: dict[str, str] | None = None):
    """`baton ARGS` in this process; stdout and stderr kept apart, as a shell sees them."""
    env = {"COLUMNS": str(columns), "BATON_FAIL": None, **(env or {})}
    return CliRunner().invoke(app, list(args), env=env, terminal_width=columns)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


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
def test_an_invalid_train_flag_fails_naming_the_field_and_writes_nothing(in_tmp, flags, field, hint):
    out = baton("train", *flags)
    assert out.exit_code == 2, out.output
    assert f"{field}:" in out.stderr.replace("\n", " "), out.stderr
    assert hint in out.stderr.replace("\n", " ")
    assert list(in_tmp.iterdir()) == []  # no checkpoints folder, no Prefect or Ray files


def test_an_unknown_key_in_the_config_file_is_named(in_tmp):
    (in_tmp / "run.yaml").write_text("epochs: 3\nepoch_per_block: 1\n")
    out = baton("train", "--config", "run.yaml")
    assert out.exit_code == 2
    assert "epoch_per_block" in out.stderr and "Extra inputs are not permitted" in out.stderr


def test_flags_win_over_the_config_file_and_the_plan_splits_epochs_into_blocks(in_tmp):
    (in_tmp / "run.yaml").write_text("config:\n  epochs: 5\n  epochs_per_block: 4\n  lineage: from-file\n")
    out = baton("train", "--config", "run.yaml", "--epochs-per-block", "2", "--dry-run")
    assert out.exit_code == 0, out.output
    plan = json.loads(out.stdout)
    assert plan["lineage"] == "from-file" and plan["config"]["epochs"] == 5
    assert [b["epochs"] for b in plan["blocks"]] == [[0, 1], [2, 3], [4, 4]]


def test_the_derived_lineage_is_stable_and_changes_with_the_hyper_parameters(in_tmp):
    def lineage(*flags):
        return json.loads(baton("train", "--dry-run", *flags).stdout)["lineage"]

    assert lineage() == lineage("--epochs", "9")  # more epochs continue the same lineage
    assert lineage() != lineage("--lr", "0.5")
    assert lineage().startswith("linear-")


@pytest.mark.parametrize("command", [[], ["train"], ["cleanup"], ["serve"], ["ckpt"], ["ckpt", "ls"],
                                     ["ckpt", "show"], ["ckpt", "verify"], ["ckpt", "rm"]])
def test_help_texts_keep_their_brackets_and_flags_show_no_bool_metavar(command):
    out = baton(*command, "--help", columns=200)
    assert out.exit_code == 0, out.output
    assert "<bool>" not in out.stdout
    if command == ["train"]:
        assert "LINEAGE[@ID|@latest|@best|@ALIAS]" in out.stdout
    if command == ["cleanup"]:
        assert "[default: 1h]" in out.stdout


def _commit_tiny(store: CheckpointStore, lineage: str, epoch: int, **metrics: float) -> None:
    torch.manual_seed(epoch)
    model = torch.nn.Linear(4, 2)
    position = Position(epoch=epoch, batch_in_epoch=2, epoch_complete=True, step=2 * (epoch + 1))
    files = encode(TrainingState(model=model.state_dict(), position=position, rng=[capture_rng()]))
    store.commit(lineage, position, files, metrics={"loss": 1.0 / (epoch + 1), **metrics})


def test_ckpt_ls_lists_committed_checkpoints_as_json_and_verify_fails_listing_every_corrupted_file(tmp_path):
    store = CheckpointStore(str(tmp_path / "s"))
    for epoch in range(3):
        _commit_tiny(store, "run", epoch)
    items = json.loads(baton("ckpt", "ls", store.url, "--json").stdout)
    assert [i["epoch"] for i in items] == [0, 1, 2]
    assert {"lineage", "id", "epoch", "step", "uri", "metrics", "created_at", "digest"} <= set(items[0])
    assert baton("ckpt", "verify", store.url).exit_code == 0

    first, last = items[0]["id"], items[2]["id"]
    model = tmp_path / "s" / "run" / first / "model.safetensors"
    data = bytearray(model.read_bytes()); data[-1] ^= 0xFF; model.write_bytes(bytes(data))
    (tmp_path / "s" / "run" / last / "state.json").write_text("{}")
    out = baton("ckpt", "verify", store.url, "--lineage", "run")
    assert out.exit_code == 1
    assert f"run/{first}/model.safetensors" in out.stdout and f"run/{last}/state.json" in out.stdout


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_ckpt_ls_never_cuts_an_id_however_narrow_the_output(tmp_path, columns):
    store = CheckpointStore(str(tmp_path / "a-long-store-folder" / "with-more-levels" / "checkpoints"))
    lineage = "nightly-20261127-020000-with-a-rather-long-name"
    for epoch in range(2):
        _commit_tiny(store, lineage, epoch, val_accuracy=0.91234, val_loss=0.4321, learning_rate=0.05)
    out = baton("ckpt", "ls", store.url, columns=columns)
    assert out.exit_code == 0, out.output
    for manifest in store.list(lineage):
        assert manifest.id in out.stdout, out.stdout
    assert "…" not in out.stdout


def test_ckpt_commands_on_a_store_that_does_not_exist_fail_naming_the_path(tmp_path):
    missing = str(tmp_path / "no-such-store")
    for args in (["ls", missing], ["ls", missing, "--json"], ["verify", missing], ["show", missing, "run"]):
        out = baton("ckpt", *args)
        assert out.exit_code == 2, (args, out.output)
        assert f"no checkpoint store at {missing}" in out.stderr.replace("\n", " "), out.stderr
    assert not os.path.exists(missing)


def test_ckpt_show_prints_each_fact_once(tmp_path):
    store = CheckpointStore(str(tmp_path / "s"))
    _commit_tiny(store, "run", 0, val_accuracy=0.5)
    out = baton("ckpt", "show", store.url, "run")
    assert out.exit_code == 0, out.output
    for key in ("metrics", "digest", "created_at", "parent", "id", "lineage"):
        assert out.stdout.count(f'"{key}"') == 1, (key, out.stdout)
    shown = json.loads(out.stdout)
    assert shown["metrics"] == {"loss": 1.0, "val_accuracy": 0.5} and shown["epoch"] == 0
    assert shown["uri"].endswith(f"run/{shown['id']}") and "files" in shown


def test_ckpt_pin_show_and_rm_refuse_what_would_lose_a_pinned_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path / "s"))
    for epoch in range(2):
        _commit_tiny(store, "run", epoch)
    first = store.list("run")[0].id
    assert baton("ckpt", "pin", store.url, "run", first, "--alias", "production").exit_code == 0
    shown = json.loads(baton("ckpt", "show", store.url, "run", "production").stdout)
    assert shown["id"] == first and shown["aliases"] == ["production"]
    best = json.loads(baton("ckpt", "show", store.url, "run", "best").stdout)
    assert best["epoch"] == 1  # lowest loss
    refused = baton("ckpt", "rm", store.url, "run", first)
    assert refused.exit_code == 2 and "pinned as production" in refused.stderr
    assert baton("ckpt", "unpin", store.url, "run", "--alias", "production").exit_code == 0
    assert baton("ckpt", "rm", store.url, "run", first).exit_code == 0
    assert [m.epoch for m in store.list("run")] == [1]
    bad = baton("ckpt", "show", store.url, "../x")
    assert bad.exit_code == 2 and "invalid lineage name" in bad.stderr


def test_the_baton_executable_lists_a_store_without_importing_prefect_ray_or_deployments(tmp_path):
    store = CheckpointStore(str(tmp_path / "s"))
    _commit_tiny(store, "run", 0)
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    out = subprocess.run([BATON, "ckpt", "ls", store.url, "--json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [i["lineage"] for i in json.loads(out.stdout)] == ["run"]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "ckpt" in imported and "flows" in imported  # the profile is there
    assert not imported & {"prefect", "prefect_ray", "ray", "deployments", "matplotlib"}, sorted(imported)


def _one_line_error(out) -> str:
    assert out.exit_code == 2, out.output
    assert isinstance(out.exception, SystemExit), out.exception  # no traceback: typer's exit
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.output, out.stderr
    return lines[0]


def _refused_at_once(*args: str):
    from flows._process import descendants

    before, started = descendants(), time.monotonic()
    out = baton("train", *args)
    took = time.monotonic() - started
    assert took < 10, f"refused only after {took:.1f} s"
    assert descendants() - before == set()  # no Prefect server, no Ray: nothing was started
    return _one_line_error(out)


def test_a_second_train_on_a_leased_lineage_is_refused_at_once_naming_the_holder_and_starting_nothing(in_tmp):
    from ckpt import Lease

    store = CheckpointStore(str(in_tmp / "s"))
    with Lease(store, "held", owner="the first run"):  # this process is alive: a live holder
        line = _refused_at_once("--store", store.url, "--lineage", "held")
    assert "is being trained by the first run" in line and f"baton preempt {store.url} held" in line
    assert "from scratch" not in line


def test_train_on_a_store_that_is_a_file_is_refused_at_once_naming_it(in_tmp):
    (in_tmp / "bad").write_text("not a folder")
    line = _refused_at_once("--store", str(in_tmp / "bad"), "--lineage", "x")
    assert f"{in_tmp / 'bad'} is a file, not a checkpoint store" in line and "from scratch" not in line
    line = _refused_at_once("--store", str(in_tmp / "bad" / "below"), "--lineage", "x")
    assert f"{in_tmp / 'bad'} is a file" in line


def test_preempt_tells_a_bad_name_a_garbage_lease_and_a_missing_or_file_store_in_one_line(in_tmp):
    store = in_tmp / "s"
    (store / "a1" / "_lease").mkdir(parents=True)
    (store / "a1" / "_lease" / "current.json").write_text("garbage")
    (in_tmp / "afile").write_text("x")
    assert "invalid lineage name '../bad'" in _one_line_error(baton("preempt", str(store), "../bad"))
    assert "unreadable lease record" in _one_line_error(baton("preempt", str(store), "a1"))
    assert f"no checkpoint store at {in_tmp / 'nope'}" in _one_line_error(baton("preempt", str(in_tmp / "nope"), "a1"))
    assert "is a file, not a checkpoint store" in _one_line_error(baton("preempt", str(in_tmp / "afile"), "a1"))
    nobody = baton("preempt", str(store), "a2")
    assert nobody.exit_code == 1 and "no run is training a2" in nobody.stderr


def test_cleanup_and_ckpt_ls_name_a_store_that_is_missing_or_a_file(in_tmp):
    (in_tmp / "afile").write_text("x")
    assert f"no checkpoint store at {in_tmp / 'nope'}" in _one_line_error(baton("cleanup", str(in_tmp / "nope")))
    assert "is a file" in _one_line_error(baton("cleanup", str(in_tmp / "afile"), "--keep-last", "1"))
    assert "is a file" in _one_line_error(baton("ckpt", "ls", str(in_tmp / "afile")))


# What `ray.init` does from its first line in the driver (Ray 2.60: `signal.signal(SIGTERM,
# lambda signum, frame: sys.exit(signum))`), then a SIGTERM while it starts Ray's processes.
RAY_INIT_THEN_SIGTERM = """
import os, signal, subprocess, sys, time
from flows import signals
signals.install()
with signals.through_ray_init():
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    child = subprocess.Popen(["sleep", "60"])
    print(child.pid, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""


def test_a_sigterm_while_ray_init_holds_its_own_handler_ends_baton_at_once_with_one_line_and_its_children():
    root = Path(__file__).resolve().parents[2]
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", RAY_INIT_THEN_SIGTERM], cwd=root, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 128 + 15, (out.returncode, out.stderr)  # not Ray's exit status 15
    assert time.monotonic() - started < 20
    assert out.stderr.strip().splitlines() == ["baton: SIGTERM: stopped during start-up, before training began"]
    child = int(out.stdout)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}"), "a process started during ray.init outlived baton"


def test_ray_init_still_puts_its_own_sigterm_handler_in_place_or_through_ray_init_can_go():
    import inspect

    import ray

    assert "sys.exit(signum)" in inspect.getsource(ray.init)


@pytest.mark.parametrize("after_s", [0.5, 1.5])
def test_ctrl_c_while_baton_train_starts_ends_it_at_once_in_one_line_without_a_traceback(tmp_path, after_s):
    """While Python imports typer, pydantic or torch: before any server or Ray is started. (In
    Python's own first ~0.1 s, before the first line of Baton runs, Python's default handling
    remains: a three-line KeyboardInterrupt.)"""
    import signal

    from flows._process import descendants

    before = descendants()
    proc = subprocess.Popen([BATON, "train", "--store", str(tmp_path / "s"), "--lineage", "early"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PREFECT_API_URL": "", "BATON_FAIL": ""})
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    output, _ = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5, output
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in output, output
    if proc.returncode == 130:  # our handler was in place (not in Python's own first milliseconds)
        assert "SIGINT: stopped during start-up, before training began" in output, output
    assert descendants() - before == set()
