"""Warm starts across lineages, and pruning by policy while training."""

from __future__ import annotations

import pytest

from ckpt import CheckpointStore

from .support import run_baton

pytestmark = pytest.mark.integration


def _ok(out):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_a_new_lineage_warm_starts_from_another_lineages_checkpoint(cluster_env, workdir):
    store = str(workdir / "ckpts")
    base = ["train", "--store", store, "--epochs", "2", "--epochs-per-block", "2"]
    _ok(run_baton([*base, "--lineage", "first"], cluster_env, workdir))
    _ok(run_baton([*base, "--lineage", "second", "--init-from", "first@latest"], cluster_env, workdir))
    st = CheckpointStore(store)
    first, second = st.list("first"), st.list("second")
    assert second[0].parent == f"first/{first[-1].id}"
    # Starting from trained weights, the new lineage's first epoch beats the old one's first epoch.
    assert second[0].metrics["loss"] < first[0].metrics["loss"]
    assert second[0].digest != first[0].digest

    bad = run_baton([*base, "--lineage", "third", "--init-from", "first@no-such-alias"], cluster_env, workdir)
    assert bad.returncode != 0 and "has no alias 'no-such-alias'" in bad.stdout + bad.stderr


def test_a_retention_policy_in_the_config_prunes_while_training(cluster_env, workdir):
    store = str(workdir / "ckpts")
    (workdir / "run.yaml").write_text("epochs: 4\nepochs_per_block: 2\nprune:\n  keep_last: 2\n")
    out = _ok(run_baton(["train", "--config", "run.yaml", "--store", store, "--lineage", "pruned"],
                        cluster_env, workdir))
    remaining = CheckpointStore(store).list("pruned")
    assert [m.epoch for m in remaining] == [2, 3]
    assert "pruned pruned:" in out.stderr
    assert CheckpointStore(store).verify_lineage("pruned") == []
