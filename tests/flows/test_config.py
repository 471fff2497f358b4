"""TrainConfig: settings declared once, flags generated from them, the block plan, normalisation."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.config import TrainConfig
from tasks.runtime.settings import TrainSettings

runner = CliRunner()


def test_every_config_field_is_a_train_flag_with_its_description():
    out = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    for name, field in TrainConfig.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        assert flag in out.output, f"{flag} missing from baton train --help"
        assert field.description.split()[0] in out.output


def test_a_flag_reaches_the_config_typed_and_json_flags_are_parsed(tmp_path):
    out = runner.invoke(app, ["train", "--dry-run", "--store", str(tmp_path), "--cpus-per-worker", "2",
                              "--gpus-per-worker", "0.5", "--options", '{"width": 8}', "--checkpoint-mode", "async"])
    assert out.exit_code == 0, out.output
    config = json.loads(out.output)["config"]
    assert (config["cpus_per_worker"], config["gpus_per_worker"]) == (2.0, 0.5)
    assert config["options"] == {"width": 8} and config["checkpoint_mode"] == "async"


def test_a_bad_flag_value_is_refused_naming_the_field():
    out = runner.invoke(app, ["train", "--dry-run", "--gpus-per-worker", "-1"])
    assert out.exit_code == 2 and "gpus_per_worker" in out.output


def test_blocks_cover_the_epochs_and_carry_the_settings_unchanged(tmp_path):
    config = TrainConfig(store=str(tmp_path), lineage="plan", epochs=5, epochs_per_block=2, workers=3,
                         gpus_per_worker=1, options={"k": 1})
    blocks = config.blocks(fence=7)
    assert [(b.start_epoch, b.end_epoch) for b in blocks] == [(0, 2), (2, 4), (4, 5)]
    assert all(b.settings == config.settings() and b.fence == 7 and b.lineage == "plan" for b in blocks)
    assert blocks[0].params.options == {"k": 1} and blocks[0].import_paths == [os.getcwd()]
    assert set(type(blocks[0].settings).model_fields) == set(TrainSettings.model_fields)


def test_a_relative_store_is_made_absolute_once_and_urls_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(store="ckpts").store == str(tmp_path / "ckpts")
    assert TrainConfig(store="s3://bucket/runs").store == "s3://bucket/runs"
    assert TrainConfig(sample_log="samples").sample_log == str(tmp_path / "samples")


def test_init_from_is_validated_and_parsed_into_lineage_and_selector():
    assert TrainConfig(init_from="base").init_source == ("base", "latest")
    assert TrainConfig(init_from="base@best").init_from == "base@best"
    with pytest.raises(ValueError, match="init_from is LINEAGE"):
        TrainConfig(init_from="../escape@latest")


def test_a_loop_names_the_derived_lineage_and_changes_the_config_hash():
    plain = TrainConfig()
    looped = TrainConfig(loop="examples.digits:train_loop")
    assert looped.resolved_lineage().startswith("digits-") and looped.config_hash() != plain.config_hash()
    assert TrainConfig(loop="examples.digits:train_loop", cpus_per_worker=2).config_hash() != looped.config_hash()


@pytest.mark.parametrize("text, says", [("config: 5\n", "not int 5"), ("config:\n", "not NoneType"),
                                        ("- 1\n- 2\n", "not list"), ("epochs: true\n", "epochs")])
def test_a_config_file_of_the_wrong_shape_or_type_is_refused_with_a_message(tmp_path, text, says):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    out = runner.invoke(app, ["train", "--dry-run", "--config", str(path)])
    assert out.exit_code == 2 and says in out.output and "Traceback" not in out.output


def test_a_rerun_of_a_finished_lineage_answers_from_the_store_without_a_server(tmp_path):
    from ckpt import CheckpointStore
    from flows.config import already_trained
    from tasks.runtime.worker import run_local

    config = TrainConfig(store=str(tmp_path), lineage="done", workers=1, epochs=2, epochs_per_block=1)
    assert already_trained(config) is None
    for spec in config.blocks():
        run_local(spec)
    summary = already_trained(config)
    assert summary.epochs_trained == 0 and summary.final.epochs_done == 2
    assert already_trained(config.model_copy(update={"epochs": 3})) is None
    out = runner.invoke(app, ["train", "--store", str(tmp_path), "--lineage", "done", "--workers", "1",
                              "--epochs", "2", "--epochs-per-block", "1"])
    assert out.exit_code == 0 and "nothing to train" in out.output
    # A damaged newest checkpoint is no answer: the run must train (and repair) it.
    st = CheckpointStore(str(tmp_path))
    newest = st.latest("done")
    path = st.path("done", newest.id, "model.safetensors")
    data = st.fs.cat_file(path)
    st.fs.pipe(path, data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert already_trained(config) is None
