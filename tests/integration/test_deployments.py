"""Deployments served by `baton serve` against a real Prefect server, started with
`prefect deployment run`, retried the way the UI's Retry button does it, and fired by a schedule."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ckpt import CheckpointStore

from .support import start_baton, wait_for, warm_groups_alive

pytestmark = pytest.mark.integration

PREFECT = str(Path(sys.executable).parent / "prefect")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# ---- a Prefect API client in a few lines (what the UI calls) ---------------------------------

def api(url: str, method: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def flow_run(url: str, run_id: str) -> dict:
    return api(url, "GET", f"/flow_runs/{run_id}")


def wait_final(url: str, run_id: str, timeout: float, serving: subprocess.Popen, log: Path) -> dict:
    run = wait_for(lambda: (r := flow_run(url, run_id))["state"]["type"] in FINAL and r, timeout,
                   f"flow run {run_id} to finish", serving, log)
    return run


def retry_like_the_ui(url: str, run_id: str) -> dict:
    """Exactly the request of the UI's Retry button (prefect UI bundle: `retryFlowRun`)."""
    return api(url, "POST", f"/flow_runs/{run_id}/set_state",
               {"state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"},
                "force": False})


def artifacts(url: str, run_id: str) -> list[dict]:
    return api(url, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})


def deployment(url: str, name: str) -> dict:
    return api(url, "GET", f"/deployments/name/{name}")


def run_deployment(name: str, params: dict, env: dict[str, str], cwd: Path) -> str:
    out = subprocess.run([PREFECT, "deployment", "run", name, "--params", json.dumps(params)], env=env,
                         cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out.stdout).group(1)


# ---- `baton serve` as a real process -----------------------------------------------------------

@contextlib.contextmanager
def serving(env: dict[str, str], workdir: Path, *args: str):
    """`baton serve` until the block ends, then stopped the way a user stops it (Ctrl-C)."""
    log = workdir / f"serve-{time.monotonic_ns()}.log"
    # Poll for runs every second (default 10 s) so a retried or scheduled run starts at once.
    proc = start_baton(["serve", *args], dict(env, PREFECT_RUNNER_POLL_FREQUENCY="1"), workdir, log)
    try:
        wait_for(lambda: "deployments are being served" in log.read_text(), 120, "baton serve to start", proc, log)
        yield proc, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _detail(url: str, run_id: str, log: Path) -> str:
    run = flow_run(url, run_id)
    return f"{run['state']}\n--- serve log ---\n{log.read_text()[-6000:]}"


# ---- tests --------------------------------------------------------------------------------------

def test_an_on_demand_deployment_run_trains_end_to_end_and_publishes_its_artifacts(
        cluster_env, prefect_server, workdir):
    store = str(workdir / "ckpts")
    config = {"store": store, "lineage": "served", "epochs": 4, "epochs_per_block": 2, "workers": 2}
    with serving(cluster_env, workdir, "--store", store) as (proc, log):
        run_id = run_deployment("train/on-demand", {"config": config}, cluster_env, workdir)
        run = wait_final(prefect_server, run_id, 300, proc, log)
        assert run["state"]["type"] == "COMPLETED", _detail(prefect_server, run_id, log)
        manifests = CheckpointStore(store).list("served")
        assert [m.epoch for m in manifests if m.position.epoch_complete] == [0, 1, 2, 3]

        found = {a["key"]: a for a in artifacts(prefect_server, run_id)}
        assert {"served-checkpoints", "served-latest", "served-summary", "served-progress"} <= set(found), found.keys()
        rows = json.loads(found["served-checkpoints"]["data"])
        assert found["served-checkpoints"]["type"] == "table"
        assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
        assert {"epoch", "step", "loss", "location", "digest"} <= set(rows[0])
        assert rows[-1]["digest"] == manifests[-1].digest
        assert f"{manifests[-1].id})" in found["served-latest"]["data"]  # markdown [text](uri)
        summary = found["served-summary"]["data"]
        assert "data:image/png;base64," in summary and "loss" in summary
        assert found["served-progress"]["type"] == "progress" and found["served-progress"]["data"] == 100

        cleanup_id = run_deployment("cleanup/nightly", {"config": {"store": store, "policy": {"keep_last": 2}}},
                                    cluster_env, workdir)
        cleaned = wait_final(prefect_server, cleanup_id, 120, proc, log)
        assert cleaned["state"]["type"] == "COMPLETED", _detail(prefect_server, cleanup_id, log)
        assert [m.epoch for m in CheckpointStore(store).list("served")] == [2, 3]
        assert any(a["key"] == "cleanup-decisions" for a in artifacts(prefect_server, cleanup_id))

    # Stopped (Ctrl-C): the schedules are still active, for the next serving process.
    for name in ("nightly-retrain/nightly", "cleanup/nightly"):
        served = deployment(prefect_server, name)
        assert served["paused"] is False and served["schedules"]
        assert all(s["active"] for s in served["schedules"]), served["schedules"]


@pytest.mark.parametrize("name, flow_retries, old_group", [("train/on-demand", 0, "still there"),
                                                             ("nightly-retrain/nightly", 1, "idled out")])
def test_a_run_failed_mid_block_and_retried_like_the_ui_button_completes_from_its_latest_checkpoint(
        cluster_env, prefect_server, workdir, name, flow_retries, old_group):
    """The retry keeps the flow run id; block 0 is not trained again; block 1 resumes from the
    mid-epoch checkpoint committed before the failure. With flow retries (nightly-retrain has one),
    the failure fires once more than there are retries, and the UI retry must not hang in
    AwaitingRetry (prefect issues 17913, 15482). The failed run's warm worker group is either still
    there when the retry comes (it is replaced: the retry holds a new lease) or has idled out."""
    store = str(workdir / "ckpts")
    config = {"store": store, "lineage": "retried", "epochs": 2, "epochs_per_block": 1, "workers": 2,
              "checkpoint_every_steps": 2, "max_failures": 0, "block_retries": 0,
              "warm_idle_timeout_s": 120 if old_group == "still there" else 5,
              "fail": {"action": "raise", "epoch": 1, "batch": 3, "times": 1 + flow_retries}}
    with serving(cluster_env, workdir, "--store", store) as (proc, log):
        run_id = run_deployment(name, {"config": config}, cluster_env, workdir)
        failed = wait_final(prefect_server, run_id, 300, proc, log)
        assert failed["state"]["type"] == "FAILED", _detail(prefect_server, run_id, log)
        assert failed["run_count"] == 1 + flow_retries
        [lineage] = CheckpointStore(store).lineages()
        before = CheckpointStore(store).list(lineage)
        latest = before[-1]
        assert latest.epoch == 1 and not latest.position.epoch_complete, [m.id for m in before]
        if old_group == "still there":
            assert warm_groups_alive(cluster_env, lineage)[0] == 1
        else:
            wait_for(lambda: warm_groups_alive(cluster_env, lineage)[0] == 0, 120, "the old group to idle out",
                     proc, log)

        accepted = retry_like_the_ui(prefect_server, run_id)
        assert accepted["status"] == "ACCEPT", accepted
        done = wait_final(prefect_server, run_id, 300, proc, log)
        assert done["state"]["type"] == "COMPLETED", _detail(prefect_server, run_id, log)
        assert done["id"] == run_id

    after = CheckpointStore(store).list(lineage)
    assert [m.epoch for m in after if m.position.epoch_complete] == [0, 1]
    # Nothing committed before the retry was rewritten; the first new checkpoint continues the latest.
    old = {m.id: m.created_at for m in before}
    assert all(m.created_at == old[m.id] for m in after if m.id in old)
    new = [m for m in after if m.id not in old]
    assert new and new[0].parent == latest.id and new[0].epoch == 1


def test_the_nightly_schedule_fires_and_each_night_warm_starts_from_the_previous_nightly_lineage(
        cluster_env, prefect_server, workdir):
    store = str(workdir / "ckpts")
    config_file = workdir / "nightly.yaml"
    config_file.write_text(json.dumps({"store": store, "epochs": 1, "epochs_per_block": 1, "workers": 2}))
    nightly_store = CheckpointStore(store)

    def scheduled_runs_completed() -> list[dict]:
        nightly = deployment(prefect_server, "nightly-retrain/nightly")
        runs = api(prefect_server, "POST", "/flow_runs/filter", {
            "flow_runs": {"deployment_id": {"any_": [nightly["id"]]}, "state": {"type": {"any_": ["COMPLETED"]}}},
            "sort": "EXPECTED_START_TIME_ASC"})
        return [r for r in runs if r["auto_scheduled"]]  # not the runs started by hand in other tests

    with serving(cluster_env, workdir, "--config", str(config_file), "--interval", "20", "--limit", "1") as (proc, log):
        runs = wait_for(lambda: len(r := scheduled_runs_completed()) >= 2 and r, 300, "two scheduled nightly runs",
                        proc, log)
        # Two nights are enough: pausing deletes the runs scheduled after them.
        api(prefect_server, "PATCH", f"/deployments/{runs[0]['deployment_id']}", {"paused": True})

    first, second = [n for n in nightly_store.lineages() if n.startswith("nightly-")][:2]
    assert re.fullmatch(r"nightly-\d{8}-\d{6}", first) and first < second
    [from_scratch] = nightly_store.list(first)
    warm = nightly_store.list(second)[0]
    assert from_scratch.parent is None
    assert warm.parent == f"{first}/{from_scratch.id}"
