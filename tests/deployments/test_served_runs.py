"""A served deployment run with a partial config, end to end against a real Prefect server and Ray
cluster: it trains into the served store, is named and tagged by its lineage, and the lineage's
page says where a Retry resumes after a failure and tells the whole story after the retry."""

from __future__ import annotations

import json

import pytest

from ckpt import CheckpointStore
from tests.integration.test_deployments import (_detail, api, flow_run, retry_like_the_ui, run_deployment, serving,
                                                wait_final)

pytestmark = pytest.mark.integration


def _latest_artifact(url: str, key: str) -> str:
    return api(url, "GET", f"/artifacts/{key}/latest")["data"]


def _logs(url: str, run_id: str) -> list[str]:
    return [entry["message"] for entry in
            api(url, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})]


def test_a_partial_config_trains_into_the_served_store_and_the_lineage_page_says_where_retry_resumes(
        cluster_env, prefect_server, workdir):
    store = str(workdir / "served-store")
    partial = {"lineage": "partial", "epochs": 2, "epochs_per_block": 1, "checkpoint_every_steps": 2,
               "max_failures": 0, "block_retries": 0, "fail": {"action": "raise", "epoch": 1, "batch": 3}}
    with serving(cluster_env, workdir, "--store", store) as (proc, log):
        run_id = run_deployment("train/on-demand", {"config": partial}, cluster_env, workdir)
        failed = wait_final(prefect_server, run_id, 300, proc, log)
        assert failed["state"]["type"] == "FAILED", _detail(prefect_server, run_id, log)

        # The served store, not ./checkpoints in the serving process's folder.
        assert not (workdir / "checkpoints").exists()
        latest = CheckpointStore(store).latest("partial")
        assert latest is not None and latest.epoch == 1 and not latest.position.epoch_complete
        effective = [m for m in _logs(prefect_server, run_id) if m.startswith("effective config: ")]
        assert effective and json.loads(effective[0].split(": ", 1)[1])["store"] == store, effective

        assert failed["name"].startswith("partial-") and "lineage:partial" in failed["tags"], failed
        page = _latest_artifact(prefect_server, "partial-lineage")
        assert (f"latest committed checkpoint is `{latest.id}` (epoch {latest.epoch}, step {latest.step}); "
                "Retry resumes there") in page, page
        assert "file://" not in _latest_artifact(prefect_server, "partial-latest")

        assert retry_like_the_ui(prefect_server, run_id)["status"] == "ACCEPT"
        done = wait_final(prefect_server, run_id, 300, proc, log)
        assert done["state"]["type"] == "COMPLETED", _detail(prefect_server, run_id, log)

    page = _latest_artifact(prefect_server, "partial-lineage")
    assert "completed: epoch 2 of 2" in page and "Retry resumes there" not in page, page
    assert "data:image/png;base64," in page
    manifests = CheckpointStore(store).list("partial")
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert len(rows) == len(manifests) and all(done["name"] in row for row in rows), rows
    table = json.loads(_latest_artifact(prefect_server, "partial-checkpoints"))
    assert [r["id"] for r in table] == [m.id for m in manifests] and all(r["flow_run"] != "-" for r in table)
