"""The language-model example on one GPU: killed mid-epoch and resumed, it ends bit-identical to
an uninterrupted run. Needs CUDA: skipped, with the reason, where there is none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt import CheckpointStore

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the GPU "
                                 "tests run on an accelerator machine (results in BENCHMARKS.md)")]

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"loop": "examples.lm:train_loop", "epochs": 3, "epochs_per_block": 1, "workers": 1,
          "gpus_per_worker": 1, "checkpoint_every_steps": 5,
          "options": {"width": 256, "layers": 4, "heads": 8, "context": 128, "batch": 32, "accumulate": 2,
                      "windows": 1280, "num_workers": 2}}


def _start(store: Path, lineage: str, mode: str) -> subprocess.Popen:
    fields = json.dumps({**FIELDS, "checkpoint_mode": mode})
    return subprocess.Popen([sys.executable, "-m", "tests.tasks._run_local", str(store), lineage, fields],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))


def _finish(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_language_model_on_a_gpu_killed_mid_epoch_resumes_bit_identical(tmp_path, mode):
    store = CheckpointStore(str(tmp_path))
    straight = _finish(_start(tmp_path, "straight", mode))
    losses = [r["loss"] for r in straight["reports"]]
    assert losses[-1] < losses[0], f"the loss did not fall: {losses}"

    proc = _start(tmp_path, "killed", mode)
    deadline = time.monotonic() + 300
    while not any(not m.position.epoch_complete and m.epoch >= 1 for m in store.list("killed")):
        assert proc.poll() is None and time.monotonic() < deadline, "no mid-epoch checkpoint in epoch 1"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = store.latest("killed")
    resumed = _finish(_start(tmp_path, "killed", mode))
    final, expected = store.latest("killed"), store.latest("straight")
    print(json.dumps({"device": torch.cuda.get_device_name(0), "mode": mode, "straight_s": round(straight["seconds"], 2),
                      "resumed_s": round(resumed["seconds"], 2), "killed_at": killed_at.id,
                      "digest": final.digest, "losses": losses}))
    assert final.step == expected.step and final.digest == expected.digest
