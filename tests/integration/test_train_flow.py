"""The train flow end to end: real `baton` processes, a real Ray cluster and Prefect server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ckpt import CheckpointStore

from .support import BATON, epochs_committed, kill_group, listing, run_baton, start_baton, wait_for

pytestmark = pytest.mark.integration


def _flow_run_state(api_url: str, flow_run_id: str) -> str:
    with urllib.request.urlopen(f"{api_url}/flow_runs/{flow_run_id}", timeout=10) as response:
        return json.loads(response.read())["state"]["type"]


def _flow_run_logs(api_url: str, flow_run_id: str) -> list[str]:
    """Every log line of the flow run and its task runs, as the UI's Logs tab shows them."""
    body = json.dumps({"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}).encode()
    request = urllib.request.Request(f"{api_url}/logs/filter", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return [entry["message"] for entry in json.loads(response.read())]


def _log_file(stderr: str) -> Path:
    """The log file `baton train` names for Ray's and Prefect's own output."""
    return Path(re.search(r"output goes to\s+(\S+\.log)", stderr)[1])


def test_two_workers_four_epochs_in_blocks_of_two_commit_four_checkpoints_with_falling_loss(
        cluster_env, prefect_server, workdir):
    store = str(workdir / "ckpts")
    out = run_baton(["train", "--store", store, "--lineage", "demo", "--epochs", "4", "--epochs-per-block", "2",
                     "--workers", "2", "--json"], cluster_env, workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["epochs_trained"] == 4 and summary["blocks_trained"] == 2
    items = listing(store, "demo", cluster_env, workdir)
    assert [it["epoch"] for it in items] == [0, 1, 2, 3]
    losses = [it["metrics"]["loss"] for it in items]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    assert {"lineage", "id", "epoch", "step", "uri", "metrics", "created_at", "digest"} <= set(items[0])
    # The flow run is Completed on the shared Prefect server, with a log line per epoch.
    run_ids = {line.split("/runs/flow-run/")[1].split()[0] for line in out.stderr.splitlines() if "/runs/flow-run/" in line}
    assert run_ids and all(_flow_run_state(prefect_server, rid) == "COMPLETED" for rid in run_ids)
    assert sum("end of epoch" in line and "loss" in line for line in out.stderr.splitlines()) == 4
    # What the UI shows: the workers' messages and the last block's closing lines reached the run's logs.
    logs = [line for rid in run_ids for line in _flow_run_logs(prefect_server, rid)]
    assert any(line.startswith("block 0 ready to train in") for line in logs), logs
    assert any(line.startswith("block 1 done in") for line in logs), logs
    assert sum(line == "Finished in state Completed()" for line in logs) >= 3, logs  # 2 blocks and the flow

    again = run_baton(["train", "--store", store, "--lineage", "demo", "--epochs", "4", "--json"], cluster_env, workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout[again.stdout.index("{"):])["epochs_trained"] == 0
    assert "nothing to train" in again.stdout + again.stderr and "output goes to" not in again.stderr  # no Ray
    assert listing(store, "demo", cluster_env, workdir) == items


def test_the_terminal_of_a_two_block_run_shows_baton_lines_and_a_summary_and_the_log_file_has_ray_output(
        cluster_env, workdir):
    store = str(workdir / "ckpts")
    out = run_baton(["train", "--store", store, "--lineage", "quiet", "--epochs", "2", "--epochs-per-block", "1"],
                    cluster_env, workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    terminal = out.stdout + out.stderr
    assert "Traceback" not in terminal and "TrainingReport(" not in terminal and "core_worker.cc" not in terminal
    assert "pid=" not in terminal and "Started a local Ray" not in terminal
    progress = [line for line in out.stderr.splitlines() if "progress: epoch" in line]
    assert progress and "progress: epoch 2 of 2, step 8, loss 0.6" in progress[-1], out.stderr
    assert "block-1: block 1 done in" in out.stderr
    # In time order, whichever process logged them: the last block's lines before the flow's last one.
    lines = out.stderr.splitlines()
    closing = next(i for i, line in enumerate(lines) if "trained 2 epoch(s)" in line)
    assert all(i < closing for i, line in enumerate(lines) if " block-" in line), out.stderr
    # The summary: a short table, metrics rounded, naming the log file, which has all of Ray's output.
    assert re.search(r"epochs\s+2 of 2 \(2 trained in 2 block\(s\)\)", out.stdout), out.stdout
    assert re.search(r"metrics\s+loss 0\.\d{1,4}\s*$", out.stdout, re.M), out.stdout
    log = Path(re.search(r"full log\s+(\S+)", out.stdout)[1])
    assert log == _log_file(out.stderr) and "TrainingReport(" in log.read_text()
    assert len(out.stdout.splitlines()) <= 8


def test_a_failed_run_says_once_what_failed_and_where_the_same_command_resumes(cluster_env, workdir):
    env = dict(cluster_env, BATON_FAIL=json.dumps({"action": "raise", "epoch": 1, "batch": 2}))
    out = run_baton(["train", "--store", str(workdir / "ckpts"), "--lineage", "failing", "--epochs", "2",
                     "--block-retries", "0", "--max-failures", "0"], env, workdir)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    terminal = out.stdout + out.stderr
    assert "Traceback" not in terminal and "ray::" not in terminal and "\x1b[" not in terminal, terminal
    failures = [line for line in out.stderr.splitlines() if "failure injection" in line]
    assert failures == ["train failed: InjectedFailure: failure injection: rank 0 fails at batch of epoch 1 batch 2"], \
        out.stderr
    assert "the latest committed checkpoint of failing is 000000-0000000004 (epoch 0, step 4); the same command " \
           "resumes there" in out.stderr
    assert "full log: " in out.stderr and "Traceback" in _log_file(out.stderr).read_text()


def test_two_runs_side_by_side_each_on_its_own_local_ray_complete_with_no_traceback(base_env, prefect_server, workdir):
    env = dict(base_env, PREFECT_API_URL=prefect_server)  # no RAY_ADDRESS: each run starts its own Ray
    args = ["train", "--epochs", "1", "--workers", "1"]
    runs = [subprocess.Popen([BATON, *args, "--store", str(workdir / name), "--lineage", name], env=env, cwd=workdir,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("left", "right")]
    outs = [run.communicate(timeout=420) for run in runs]
    for run, (stdout, stderr) in zip(runs, outs):
        assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]
        full = _log_file(stderr).read_text()
        assert "Started a local Ray instance" in full  # each had its own cluster
        # ...and started its worker group with it, while the flow run began (the block then used it).
        assert "block 0 trained on the worker group started with the run" in full, full[-4000:]
        assert "Found multiple active Ray instances" not in full and "Traceback" not in full, full[-4000:]


def test_a_run_starts_its_temporary_prefect_server_and_completes_while_both_cores_are_busy(cluster_env, workdir):
    env = {k: v for k, v in cluster_env.items() if k != "PREFECT_API_URL"}  # the temporary server path
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        time.sleep(2)
        out = run_baton(["train", "--store", str(workdir / "ckpts"), "--lineage", "loaded", "--epochs", "1",
                         "--workers", "1"], env, workdir, timeout=600)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "epochs      1 of 1" in out.stdout or re.search(r"epochs\s+1 of 1", out.stdout), out.stdout


def test_a_run_killed_after_its_epoch_one_checkpoint_resumes_without_training_any_epoch_twice(
        cluster_env, prefect_server, workdir):
    store = str(workdir / "ckpts")
    log = workdir / "first.log"
    args = ["train", "--store", store, "--lineage", "killed", "--epochs", "4", "--epochs-per-block", "2"]
    proc = start_baton(args, cluster_env, workdir, log)
    try:
        wait_for(lambda: 1 in epochs_committed(store, "killed"), 240, "the epoch-1 checkpoint", proc, log)
    finally:
        kill_group(proc)
    before = {m.id: m.created_at for m in CheckpointStore(store).list("killed")}
    out = run_baton(args, cluster_env, workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    after = CheckpointStore(store).list("killed")
    assert [m.epoch for m in after if m.position.epoch_complete] == [0, 1, 2, 3]
    # Nothing committed before the kill was rewritten, and every epoch has exactly one checkpoint.
    assert all(m.created_at == before[m.id] for m in after if m.id in before)
    assert len(after) == 4
    assert "block 0: killed already has" in out.stderr
    # The workers' resume point reached the terminal and the flow run's logs in the UI.
    assert "block-1: resuming killed from 000001-" in out.stderr, out.stderr
    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", out.stderr)[1]
    assert any(line.startswith("resuming killed from 000001-") for line in _flow_run_logs(prefect_server, run_id))


def test_the_digits_recipe_reaches_ninety_percent_validation_accuracy(cluster_env, workdir):
    store = str(workdir / "ckpts")
    out = run_baton(["train", "--store", store, "--recipe", "tasks.recipes:digits", "--lineage", "digits",
                     "--epochs", "6", "--epochs-per-block", "6", "--json"], cluster_env, workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    final = json.loads(out.stdout[out.stdout.index("{"):])["final"]
    assert final["metrics"]["val_accuracy"] >= 0.90, final["metrics"]
