"""Gradient accumulation across a mid-epoch resume (issue 21 item 8), in one process
(`run_local`): examples/lm.py, killed mid-epoch by failure injection and resumed, ends bit-identical
to an uninterrupted run, whether an epoch has an even or an odd number of micro-batches (the odd
last one closes a shorter window, and a resume must not lose its optimizer step)."""

from __future__ import annotations

import pytest

from ckpt import CheckpointStore

from .test_loop import _train, _train_until_failure

# 4 windows a batch: 9 batches an epoch (odd) or 8 (even), 2 micro-batches an optimizer step.
TINY = {"width": 16, "layers": 1, "heads": 2, "context": 8, "batch": 4, "accumulate": 2}


@pytest.mark.parametrize("batches", [9, 8], ids=["odd", "even"])
def test_the_language_model_killed_mid_epoch_with_accumulation_resumes_bit_identical(tmp_path, batches):
    common = dict(loop="examples.lm:train_loop", epochs=2, epochs_per_block=1, checkpoint_every_steps=2,
                  options={**TINY, "windows": 4 * batches})
    straight, straight_reports = _train(tmp_path, "straight", **common)
    # Killed in epoch 1 after its 6th micro-batch (the 3rd optimizer step), whose checkpoint is committed.
    _train_until_failure(tmp_path, "killed", fail={"epoch": 1, "batch": 6}, **common)
    killed_at = CheckpointStore(str(tmp_path)).latest("killed")
    assert (killed_at.epoch, killed_at.position.epoch_complete) == (1, False)
    resumed, resumed_reports = _train(tmp_path, "killed", **common)
    steps_per_epoch = (batches + 1) // 2
    assert straight.step == resumed.step == 2 * steps_per_epoch
    assert resumed.digest == straight.digest
    assert resumed_reports[-1]["loss"] == pytest.approx(straight_reports[-1]["loss"], rel=1e-12)
