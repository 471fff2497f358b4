"""Preemption through `baton train`: SIGTERM becomes a checkpoint of the step the workers are at,
the process exits promptly, and the rerun trains no step twice. A cancel from the Prefect API (the
UI's Cancel button) does the same, for a run in a terminal and for a served deployment's run."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ckpt import CheckpointStore, Lease

from .support import kill_group, run_baton, start_baton, wait_for
from .test_deployments import api, flow_run, retry_like_the_ui, run_deployment, serving, wait_final
from .test_scale_out import RAY, Placements, two_nodes  # noqa: F401  (two_nodes: the two-node cluster fixture)

pytestmark = pytest.mark.integration

ARGS = ["--recipe", "tests.integration.recipes:slow_drill", "--workers", "2", "--epochs", "4",
        "--epochs-per-block", "2", "--checkpoint-every-steps", "4", "--warm-idle-timeout-s", "10"]


def _train(store: str, lineage: str, env, cwd: Path, *extra: str) -> str:
    out = run_baton(["train", "--store", store, "--lineage", lineage, *ARGS, *extra], env, cwd, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


def test_sigterm_at_five_random_moments_commits_the_step_and_the_rerun_trains_no_step_twice(cluster_env, workdir):
    store, samples = str(workdir / "ckpts"), workdir / "samples"
    _train(store, "straight", cluster_env, workdir)
    st, rng = CheckpointStore(store), random.Random(20261128)
    args = ["train", "--store", store, "--lineage", "noticed", *ARGS, "--sample-log", str(samples)]
    stopped_with_checkpoint = 0
    for attempt in range(5):
        committed = len(st.list("noticed"))
        log = workdir / f"attempt{attempt}.log"
        proc = start_baton(args, cluster_env, workdir, log)
        wait_for(lambda: len(st.list("noticed")) > committed or proc.poll() is not None, 300, "a new checkpoint")
        time.sleep(rng.uniform(0.0, 1.5))
        noticed = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        text = log.read_text()
        if proc.returncode == 0:
            break  # training finished before the signal landed
        assert time.monotonic() - noticed < 60, "the process did not exit promptly after SIGTERM"
        if "preempted at epoch" in text:
            stopped_with_checkpoint += 1
            assert "a rerun or Retry resumes there" in text
    _train(store, "noticed", cluster_env, workdir, "--sample-log", str(samples))
    assert stopped_with_checkpoint >= 3, "SIGTERM rarely became a checkpoint"
    assert st.latest("noticed").digest == st.latest("straight").digest
    entries = [json.loads(line) for f in samples.glob("rank*.jsonl") for line in f.read_text().splitlines()]
    trained = Counter((e["epoch"], e["batch"], e["rank"]) for e in entries)
    assert set(trained.values()) == {1}, f"steps trained twice: {[k for k, n in trained.items() if n > 1]}"
    assert len(trained) == 4 * 8 * 2


def cancel_like_the_ui(url: str, run_id: str) -> dict:
    """Exactly the request of the UI's Cancel button (Prefect 3.9 UI bundle: `setFlowRunState(id,
    {state: {type: 'cancelling', name: 'Cancelling'}})`)."""
    return api(url, "POST", f"/flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}})


def _running_run_of(url: str, lineage: str) -> str | None:
    runs = api(url, "POST", "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [f"lineage:{lineage}"]},
                                                                "state": {"type": {"any_": ["RUNNING"]}}}})
    return runs[0]["id"] if runs else None


def _run_logs(url: str, run_id: str) -> str:
    logs = api(url, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in logs)


def _lease_released(st: CheckpointStore, lineage: str) -> bool:
    holder = Lease.current(st, lineage)
    return holder is None or not holder.holder_alive()


def test_a_cancel_from_the_prefect_api_commits_the_step_ends_cancelled_and_retry_repeats_no_step(
        cluster_env, prefect_server, workdir):
    """The UI's Cancel, first of `baton train` in a terminal (the flow runs in that process: Baton
    watches the run's state), then of a served deployment's run (Prefect's runner sends SIGTERM);
    then the UI's Retry of the cancelled run finishes the lineage."""
    store, samples, lineage = str(workdir / "ckpts"), workdir / "samples", "cancelled"
    st = CheckpointStore(store)
    # Terminal: cancelled once block 0 has committed a mid-epoch checkpoint.
    log = workdir / "terminal.log"
    proc = start_baton(["train", "--store", store, "--lineage", lineage, *ARGS, "--sample-log", str(samples)],
                       cluster_env, workdir, log)
    try:
        wait_for(lambda: st.list(lineage), 300, "a first checkpoint", proc, log)
        run_id = wait_for(lambda: _running_run_of(prefect_server, lineage), 60, "the flow run", proc, log)
        assert cancel_like_the_ui(prefect_server, run_id)["status"] == "ACCEPT"
        cancelled_at = time.monotonic()
        proc.wait(120)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert time.monotonic() - cancelled_at < 60 and proc.returncode == 1, text[-4000:]
    run = flow_run(prefect_server, run_id)
    assert run["state"]["type"] == "CANCELLED", (run["state"], text[-4000:])
    stopped = st.latest(lineage)
    assert re.match(rf"preempted at epoch {stopped.epoch} step {stopped.step}\b", run["state"]["message"]), run["state"]
    assert f"checkpoint {stopped.id} committed" in run["state"]["message"]
    assert f"train cancelled: preempted at epoch {stopped.epoch} step {stopped.step}" in text, text[-3000:]
    assert stopped.step < 4 * 8 and _lease_released(st, lineage)

    # Served: the same lineage as a deployment run, cancelled after its first new checkpoint.
    config = {"store": store, "lineage": lineage, "recipe": "tests.integration.recipes:slow_drill", "workers": 2,
              "epochs": 4, "epochs_per_block": 2, "checkpoint_every_steps": 4, "warm_idle_timeout_s": 10,
              "sample_log": str(samples)}
    with serving(cluster_env, workdir, "--store", store) as (server, serve_log):
        run_id = run_deployment("train/on-demand", {"config": config}, cluster_env, workdir)
        wait_for(lambda: st.latest(lineage).step > stopped.step, 300, "a checkpoint of the served run", server, serve_log)
        assert cancel_like_the_ui(prefect_server, run_id)["status"] == "ACCEPT"
        run = wait_final(prefect_server, run_id, 120, server, serve_log)
        assert run["state"]["type"] == "CANCELLED", (run["state"], serve_log.read_text()[-4000:])
        served_stop = st.latest(lineage)
        # The runner writes the final state's message itself ("Flow run was cancelled successfully."):
        # where it stopped is in the run's log.
        logs = _run_logs(prefect_server, run_id)
        assert re.search(rf"preempted at epoch {served_stop.epoch} step {served_stop.step}\b", logs), logs[-3000:]
        assert served_stop.step < 4 * 8 and _lease_released(st, lineage)
        # The runner finalizes the cancel after the process exited (it sets Cancelled once more, with
        # its own message): a Retry before that would be overwritten. A person's click comes later.
        wait_for(lambda: "Cancelled flow run" in serve_log.read_text(), 60, "the runner to finish the cancel", server,
                 serve_log)
        # The UI's Retry resumes there and finishes the lineage.
        assert retry_like_the_ui(prefect_server, run_id)["status"] == "ACCEPT"
        done = wait_final(prefect_server, run_id, 300, server, serve_log)
        assert done["state"]["type"] == "COMPLETED", (done["state"], serve_log.read_text()[-4000:])
    assert st.latest(lineage).epochs_done == 4 and st.verify_lineage(lineage) == []
    entries = [json.loads(line) for f in samples.glob("rank*.jsonl") for line in f.read_text().splitlines()]
    trained = Counter((e["epoch"], e["batch"], e["rank"]) for e in entries)
    assert set(trained.values()) == {1}, f"steps trained twice: {[k for k, n in trained.items() if n > 1]}"
    assert len(trained) == 4 * 8 * 2


# ---- a Ray node drained with a deadline (two-node cluster of test_scale_out) ----------------------


def _node_ids_by_cpus(cluster) -> dict[float, str]:
    """{CPUs: node id} of the live nodes, read by a driver of the cluster (the head has 2, the worker 1)."""
    code = ("import json, ray; ray.init(logging_level='ERROR'); print(json.dumps({n['Resources'].get('CPU', 0): "
            "n['NodeID'] for n in ray.nodes() if n['Alive']}))")
    out = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return {float(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def test_a_ray_node_drained_with_a_deadline_commits_the_step_and_the_block_resumes_on_the_other_node(
        two_nodes, workdir):
    """`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds 60` of the
    worker node while block 0 trains on both nodes (SPREAD): every rank stops at one step, rank 0
    commits it, the block task is retried and its new worker group trains on the head alone."""
    store, samples, lineage = str(workdir / "ckpts"), workdir / "samples", "drained"
    st, log = CheckpointStore(store), workdir / "train.log"
    worker_node = _node_ids_by_cpus(two_nodes)[1.0]
    args = ["train", "--verbose", "--ray-address", two_nodes.address, "--store", store, "--lineage", lineage,
            "--recipe", "tests.integration.recipes:slow_drill", "--workers", "2", "--epochs", "2",
            "--epochs-per-block", "2", "--checkpoint-every-steps", "4", "--placement-strategy", "SPREAD",
            "--sample-log", str(samples)]
    placements, drained = Placements(log, two_nodes), {}
    proc = start_baton(args, two_nodes.env, workdir, log)
    try:
        deadline = time.monotonic() + 420
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"baton train did not finish:\n{log.read_text()[-4000:]}"
            placements.poll()
            if not drained and st.list(lineage):
                drained.update(groups=placements.groups(), offset=len(log.read_text(errors="replace")))
                out = subprocess.run([RAY, "drain-node", f"--address={two_nodes.address}", f"--node-id={worker_node}",
                                      "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim drill",
                                      "--deadline-remaining-seconds=60"], env=two_nodes.env, capture_output=True,
                                     text=True, timeout=60)
                assert out.returncode == 0, out.stdout + out.stderr
            time.sleep(0.2)
        placements.poll()
    finally:
        kill_group(proc)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert drained, f"training ended before a checkpoint was seen:\n{text[-3000:]}"
    # Before the drain, block 0's workers were on both nodes ...
    assert set(drained["groups"][-1].values()) == {"head", "worker"}, drained["groups"]
    # ... they stopped at one step, committed it, and said why ...
    stop = re.search(r"preempted at epoch (\d+) step (\d+); checkpoint (\S+) committed; a rerun or Retry resumes "
                     r"there \(Ray node drain: node \w+ of rank \d is draining \(deadline in \d+ s\)\)",
                     text[drained["offset"]:])
    assert stop, text[drained["offset"]:][-5000:]
    committed = {m.id: m for m in st.list(lineage)}
    assert committed[stop.group(3)].step == int(stop.group(2))
    # ... and the retried block trained on the head alone, from that checkpoint, to the end.
    after = placements.groups()[len(drained["groups"]):]
    assert after and after[-1] == {0: "head", 1: "head"}, (drained["groups"], after)
    assert f"resuming {lineage} from {stop.group(3)}" in text
    assert st.latest(lineage).epochs_done == 2 and st.verify_lineage(lineage) == []
    entries = [json.loads(line) for f in samples.glob("rank*.jsonl") for line in f.read_text().splitlines()]
    trained = Counter((e["epoch"], e["batch"], e["rank"]) for e in entries)
    assert set(trained.values()) == {1}, f"steps trained twice: {[k for k, n in trained.items() if n > 1]}"
    assert len(trained) == 2 * 8 * 2
