"""`baton cleanup` with no Prefect server: the prune runs in the command itself, at once."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
from pathlib import Path

import torch

from ckpt import CheckpointStore, Position, TrainingState, encode

BATON = str(Path(sys.executable).parent / "baton")


def _commit(store: CheckpointStore, lineage: str, epoch: int) -> str:
    position = Position(epoch=epoch, batch_in_epoch=1, epoch_complete=True, step=epoch + 1)
    files = encode(TrainingState(model=torch.nn.Linear(2, 2).state_dict(), position=position))
    return store.commit(lineage, position, files, metrics={"loss": 1.0 / (epoch + 1)}).id


@pytest.mark.slow
def test_cleanup_without_a_prefect_server_prunes_directly_and_prints_each_decision_once(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    ids = [_commit(store, "run", epoch) for epoch in range(5)]
    prefect_home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(prefect_home)  # no profile that names a server, and where a server's database would go
    out = subprocess.run([BATON, "cleanup", store.url, "--keep-last", "2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [m.id for m in store.list("run")] == ids[3:]
    for deleted in ids[:3]:
        assert out.stdout.count(f"run/{deleted}") == 1, out.stdout
    assert "deleted 3, kept 2" in out.stdout
    # A temporary Prefect server would have created its SQLite database under PREFECT_HOME.
    assert not (prefect_home / "prefect.db").exists(), sorted(p.name for p in prefect_home.rglob("*"))
