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
    steps_per_epoch = (batches + 1) // 2
    # The checkpointed position counts the loader's micro-batches, the step the optimizer's steps.
    assert (killed_at.epoch, killed_at.position.epoch_complete) == (1, False)
    assert killed_at.position.batch_in_epoch == 2 * (killed_at.step - steps_per_epoch) > 0
    resumed, resumed_reports = _train(tmp_path, "killed", **common)
    assert straight.step == resumed.step == 2 * steps_per_epoch
    assert resumed.digest == straight.digest
    assert resumed_reports[-1]["loss"] == pytest.approx(straight_reports[-1]["loss"], rel=1e-12)


def test_a_step_in_the_middle_of_an_accumulation_window_is_an_error_before_anything_is_committed(tmp_path):
    from tasks.errors import LoopError

    with pytest.raises(LoopError, match="ctx.step in the middle of an accumulation window"):
        _train(tmp_path, "midway", loop="tests.tasks.loops:steps_mid_window", epochs=1, checkpoint_every_steps=1)
    assert CheckpointStore(str(tmp_path)).list("midway") == []


def test_batch_in_epoch_counts_from_the_epochs_start_across_a_mid_epoch_resume(tmp_path):
    from tasks.runtime.resume import newest_good

    common = dict(loop="tests.tasks.loops:counts_batches", epochs=2, checkpoint_every_steps=6)
    _train_until_failure(tmp_path, "counted", fail={"epoch": 1, "batch": 20}, **common)
    assert CheckpointStore(str(tmp_path)).latest("counted").position.batch_in_epoch == 16  # step 48
    _train(tmp_path, "counted", **common)
    _, state = newest_good(CheckpointStore(str(tmp_path)), "counted")
    assert state.extra["user"]["seen"] == [[epoch, batch, 32] for epoch in (0, 1) for batch in range(1, 33)]
