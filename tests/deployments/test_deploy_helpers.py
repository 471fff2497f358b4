"""Pure helpers of the deployments and artifacts: names, warm-start choice, the loss-curve picture."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import pytest
import torch

from ckpt import CheckpointStore, InvalidName, Position, TrainingState, encode
from deployments.nightly import nightly_lineage, previous_checkpoint
from PIL import Image

from flows.artifacts import artifact_key, line_chart_png


def test_artifact_keys_keep_only_lowercase_letters_digits_and_dashes():
    assert artifact_key("Nightly_2026.11", "checkpoints") == "nightly-2026-11-checkpoints"
    assert artifact_key("___", "latest") == "lineage-latest"


def test_the_nightly_lineage_is_named_by_the_scheduled_date_in_utc():
    when = datetime(2026, 11, 27, 2, 0, tzinfo=timezone.utc)
    assert nightly_lineage("nightly", "%Y%m%d", when) == "nightly-20261127"
    assert nightly_lineage("nightly", "%Y%m%d-%H%M%S", when) == "nightly-20261127-020000"
    with pytest.raises(InvalidName):
        nightly_lineage("../escape", "%Y%m%d", when)


def _commit(store: CheckpointStore, lineage: str, epoch: int, loss: float) -> str:
    position = Position(epoch=epoch, batch_in_epoch=1, epoch_complete=True, step=epoch + 1)
    files = encode(TrainingState(model=torch.nn.Linear(2, 2).state_dict(), position=position))
    return store.commit(lineage, position, files, metrics={"loss": loss}).id


def test_the_nightly_retrain_warm_starts_from_the_newest_earlier_night_with_a_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    best = _commit(store, "nightly-20261125", 0, 0.2)
    latest = _commit(store, "nightly-20261125", 1, 0.5)
    _commit(store, "other-20261126", 0, 0.1)      # another prefix: ignored
    _commit(store, "nightly-20261128", 0, 0.1)    # later than tonight: ignored
    tonight = "nightly-20261127"
    assert previous_checkpoint(store, "nightly", tonight, "latest") == f"nightly-20261125@{latest}"
    assert previous_checkpoint(store, "nightly", tonight, "best") == f"nightly-20261125@{best}"
    assert previous_checkpoint(store, "nightly", tonight, "none") is None
    assert previous_checkpoint(store, "nightly", "nightly-20261124", "latest") is None


def test_the_loss_curve_is_a_real_png_that_changes_with_the_data():
    falling = line_chart_png({"loss": [(0, 0.7), (1, 0.6), (2, 0.5)]}, title="loss", xlabel="epoch", ylabel="loss",
                             size=(4, 2), dpi=50)
    rising = line_chart_png({"loss": [(0, 0.5), (1, 0.6), (2, 0.7)]}, title="loss", xlabel="epoch", ylabel="loss",
                            size=(4, 2), dpi=50)
    image = Image.open(io.BytesIO(falling))
    image.load()  # decodes every row
    assert image.format == "PNG" and image.size == (200, 100)
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 10  # lines, text and ticks, not a blank canvas
    assert falling != rising
