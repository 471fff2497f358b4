"""What `baton train` shows at a terminal: Baton's lines only, Ray's and Prefect's chatter in the
log file, a progress line per commit off a terminal, and a short summary table."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import torch
from rich.console import Console

from ckpt import CheckpointRef, CheckpointStore, Position, TrainingState, encode
from flows._terminal import QuietOutput, TrainMonitor, baton_line, summary_table
from flows.train import TrainSummary

# Lines as a 2-block `baton train` printed them (Ray's colour codes included).
RAY_CHATTER = [
    "\x1b[36m(RayTrainWorker pid=29309)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=None, "
    "metrics={'loss': 0.6910372227430344, 'epoch': 0, 'step': 4}, validation=False) from rank 0",
    "\x1b[36m(TrainController pid=29131)\x1b[0m [2026-11-28 06:47:15,218 E 29131 29179] core_worker.cc:2465: Actor "
    "with class name: 'PreemptionWatcher' and ID: '290e3d4e3ceacd18459f6a9401000000' has constructor arguments",
    "\x1b[36m(PlacementGroupCleaner pid=29272)\x1b[0m Traceback (most recent call last):",
    "\x1b[36m(PlacementGroupCleaner pid=29272)\x1b[0m ConnectionError: Found multiple active Ray instances: "
    "{'192.0.2.2:36729', '192.0.2.2:44057'}.",
    "2026-11-28 06:46:53,844\tINFO worker.py:2029 -- Started a local Ray instance. View the dashboard at "
    "\x1b[1m\x1b[32mhttp://127.0.0.1:8265 \x1b[39m\x1b[22m",
    "06:46:46.439 | INFO    | prefect.task_runner.rayrunner - Creating a local Ray instance",
    "06:46:35.233 | INFO    | prefect - Starting temporary server on http://127.0.0.1:8206",
    "\x1b[36m(TrainController pid=29131)\x1b[0m Requesting resources: {'CPU': 1.0} * 2",
    "\x1b[36m(train-block pid=29052)\x1b[0m 06:47:19.843 | INFO    | Task run 'block-0' - Finished in state Completed()",
    "06:46:55.474 | INFO    | Flow run 'garnet-roadrunner' - Beginning flow run 'garnet-roadrunner' for flow 'train'",
    # A failure, which `baton train` tells once itself:
    "\x1b[36m(train-block pid=29052)\x1b[0m 07:33:24.101 | ERROR   | Task run 'block-0' - Task run failed with exception: "
    "RayTaskError(RuntimeError)(RuntimeError('WorkerGroupError: Training failed due to worker errors:\\n'))",
    "07:33:26.002 | ERROR   | Flow run 'garnet-roadrunner' - Encountered exception during execution: RayTaskError",
    "07:33:28.310 | ERROR   | Flow run 'garnet-roadrunner' - Finished in state Failed('Flow run encountered an exception')",
]


def test_ray_and_prefect_chatter_is_not_shown_and_baton_run_lines_are_shortened():
    assert [line for line in RAY_CHATTER if baton_line(line) is not None] == []
    task = ("\x1b[36m(train-block pid=29052)\x1b[0m 06:47:19.612 | INFO    | Task run 'block-0' - end of epoch 0  "
            "step 4  loss 0.6910  (checkpoint 000000-0000000004)")
    assert baton_line(task) == "06:47:19 block-0: end of epoch 0  step 4  loss 0.6910  (checkpoint 000000-0000000004)"
    flow = "06:46:55.613 | INFO    | Flow run 'garnet-roadrunner' - lineage demo in /tmp/ck: 0 of 2 epochs committed"
    assert baton_line(flow) == "06:46:55 lineage demo in /tmp/ck: 0 of 2 epochs committed"
    warning = "06:46:55.613 | WARNING | Flow run 'x' - could not publish the lineage artifact: OSError: gone"
    assert baton_line(warning) == "06:46:55 WARNING: could not publish the lineage artifact: OSError: gone"
    lease = "06:46:55.700 | WARNING | ckpt.lease - took over the lease of lineage demo from flow run a (h:1)"
    assert baton_line(lease) == "06:46:55 WARNING: took over the lease of lineage demo from flow run a (h:1)"
    assert baton_line("06:46:55.700 | WARNING | prefect.events.clients - could not reach the server") is None


def test_output_of_this_process_and_its_children_goes_to_the_log_and_only_baton_lines_are_shown(tmp_path):
    shown: list[str] = []
    log = tmp_path / "logs" / "train.log"
    child = ("import sys; print('(RayTrainWorker pid=1) Reporting training result 1: TrainingReport()'); "
             "print(\"06:47:19.612 | INFO    | Task run 'block-0' - block 0 done in 3.0 s\", file=sys.stderr)")
    with QuietOutput(log, show=shown.append) as quiet:
        subprocess.run([sys.executable, "-c", child], check=True)
        os.write(2, b"Started a local Ray instance.\n")  # as C++ code and Ray's threads write
        quiet.stdout.write("to the terminal\n")
    text = log.read_text()
    assert "TrainingReport()" in text and "Started a local Ray instance." in text and "block 0 done" in text
    assert "to the terminal" not in text
    assert shown == ["06:47:19 block-0: block 0 done in 3.0 s"]


def _commit(store: CheckpointStore, epoch: int, loss: float) -> None:
    position = Position(epoch=epoch, batch_in_epoch=4, epoch_complete=True, step=4 * (epoch + 1))
    files = encode(TrainingState(model=torch.nn.Linear(2, 2).state_dict(), position=position))
    store.commit("demo", position, files, metrics={"loss": loss})


def test_off_a_terminal_each_commit_prints_one_progress_line_with_step_loss_and_eta(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    _commit(store, 0, 0.69314718)
    buffer = io.StringIO()
    monitor = TrainMonitor(store, "demo", epochs=4, console=Console(file=buffer, width=200), live=False)
    monitor.poll()  # a run that starts at epoch 1 of 4
    _commit(store, 1, 0.5)
    monitor.poll()
    monitor.poll()  # nothing new: nothing printed
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "progress: epoch 2 of 4, step 8, loss 0.5, last commit" in lines[1] and "ETA" in lines[1]
    assert "ETA -" not in lines[1]  # one epoch trained in this run: the rate is known
    assert "0.69314718" not in buffer.getvalue()


def test_the_summary_is_a_short_table_with_rounded_metrics_and_the_log_file(tmp_path):
    final = CheckpointRef(lineage="demo", id="000003-0000000016", uri="/tmp/ck/demo/000003-0000000016", epoch=3,
                          step=16, epochs_done=4, metrics={"loss": 0.6893250271677971, "val_accuracy": 0.9125},
                          digest="ab" * 32, created_at="2026-11-28T06:47:43Z")
    summary = TrainSummary(lineage="demo", store="/tmp/ck", epochs=4, epochs_trained=2, blocks_trained=1,
                           final=final, wall_time_s=48.234)
    buffer = io.StringIO()
    Console(file=buffer, width=100).print(summary_table(summary, tmp_path / "train.log"))
    text = buffer.getvalue()
    assert "loss 0.6893" in text and "val_accuracy 0.9125" in text and "0.68932502" not in text
    assert "4 of 4 (2 trained in 1 block(s))" in text and "48.2 s" in text
    assert str(tmp_path / "train.log") in text and "000003-0000000016" in text
    assert len(text.splitlines()) <= 8


def test_on_a_terminal_the_live_line_shows_epoch_step_loss_time_since_the_last_commit_and_eta(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    monitor = TrainMonitor(store, "demo", epochs=4, console=Console(file=io.StringIO()), live=True)
    monitor.poll()
    assert "epoch 0/4" in monitor.render().plain and "ETA -" in monitor.render().plain
    _commit(store, 0, 0.69314718)
    monitor.poll()
    line = monitor.render().plain
    assert "epoch 1/4" in line and "step 4" in line and "loss 0.6931" in line, line
    assert "last commit 0 s ago" in line and "ETA -" not in line and "elapsed" in line, line


def test_verbose_is_a_command_line_option_not_a_config_field(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    help_text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}, terminal_width=200).stdout
    assert "--verbose" in help_text and "log file" in help_text
    out = runner.invoke(app, ["train", "--dry-run", "--verbose", "--epochs", "2"], env={"BATON_FAIL": None})
    assert out.exit_code == 0, out.output
    assert "verbose" not in json.loads(out.stdout)["config"]


def test_the_live_display_leaves_python_level_output_where_it_was_going(tmp_path, capsys):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with TrainMonitor(CheckpointStore(str(tmp_path / "store")), "demo", epochs=2, console=console, live=True):
        print("Reporting training result 1: TrainingReport(...)")  # as Ray's log forwarding does
    assert "TrainingReport" not in buffer.getvalue()
    assert "TrainingReport" in capsys.readouterr().out


def test_the_eta_leaves_out_the_start_up_once_two_epochs_of_the_run_are_committed(tmp_path):
    import time

    store = CheckpointStore(str(tmp_path / "store"))
    monitor = TrainMonitor(store, "demo", epochs=10, console=Console(file=io.StringIO()), live=True)
    monitor.poll()
    monitor.started -= 60  # a minute of start-up before the first epoch
    _commit(store, 0, 0.7)
    monitor.poll()
    assert monitor.eta_s() > 9 * 50  # one epoch known: start-up included
    time.sleep(0.2)
    _commit(store, 1, 0.6)
    monitor.poll()
    assert monitor.eta_s() < 8 * 5  # epochs come every fraction of a second since
