"""What `baton train` shows at a terminal: Baton's lines only, read from structured log records
(this process's and the Prefect API's) in time order; Ray's and Prefect's chatter in the log file;
rich's progress display (or a progress line per commit off a terminal); and a short summary table."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from uuid import uuid4

import torch
from prefect.client.schemas.objects import Log
from rich.console import Console

from ckpt import CheckpointRef, CheckpointStore, Position, TrainingState, encode
from flows._run_log import RunLine, RunLog, from_log, from_record, terminal_line
from flows._terminal import QuietOutput, TrainMonitor, summary_table
from flows.train import TrainSummary

T0 = datetime(2026, 11, 28, 6, 47, 19, 612000, tzinfo=timezone.utc)
FLOW_RUN = uuid4()


def _log(message: str, level: int = logging.INFO, at: float = 0.0, task: bool = True) -> Log:
    """A record as the API returns it: a block task's (run in a Ray worker) or the flow's."""
    return Log(name="prefect.task_runs" if task else "prefect.flow_runs", level=level, message=message,
               timestamp=T0 + timedelta(seconds=at), flow_run_id=FLOW_RUN, task_run_id=uuid4() if task else None)


def _local(at: str) -> str:
    return (T0 + timedelta(seconds=float(at))).astimezone().strftime("%H:%M:%S")


def test_a_block_tasks_record_reads_time_level_task_and_message_and_info_carries_no_level():
    line = from_log(_log("end of epoch 0  step 4  loss 0.6910  (checkpoint 000000-0000000004)"), "block-0")
    assert terminal_line(line) == f"{_local(0)} block-0: end of epoch 0  step 4  loss 0.6910  (checkpoint 000000-0000000004)"
    warning = from_log(_log("could not publish the lineage artifact: OSError: gone", logging.WARNING, task=False), None)
    assert terminal_line(warning) == f"{_local(0)} WARNING: could not publish the lineage artifact: OSError: gone"


def test_prefects_own_run_lines_debug_records_and_tracebacks_are_not_shown():
    quiet = ["Finished in state Completed()", "Beginning flow run 'garnet-roadrunner' for flow 'train'",
             "Task run failed with exception: RayTaskError(RuntimeError)", "effective config: epochs=4",
             "Encountered exception during execution: RayTaskError", "Created task run 'block-0' for task 'train-block'"]
    assert [terminal_line(from_log(_log(m), "block-0")) for m in quiet] == [None] * len(quiet)
    assert terminal_line(from_log(_log("polling the store", logging.DEBUG), "block-0")) is None
    failed = from_log(_log("save failed: OSError\nTraceback (most recent call last):\n  File ...", logging.ERROR), "block-1")
    assert terminal_line(failed) == f"{_local(0)} ERROR: block-1: save failed: OSError"


def test_lines_come_out_in_timestamp_order_whichever_source_brought_them_first():
    shown: list[str] = []
    run_log = RunLog(show=shown.append)
    # The flow's summary, caught here as it is logged; the last block's lines reach the API later.
    summary = logging.makeLogRecord({"name": "prefect.flow_runs", "levelno": logging.INFO, "levelname": "INFO",
                                     "msg": "lineage demo: trained 4 epoch(s)", "created": (T0 + timedelta(seconds=2)).timestamp()})
    run_log.add_local(summary)
    run_log.add(from_log(_log("block 1 done in 0.3 s", at=1.0), "block-1"))
    run_log.add(from_log(_log("end of epoch 3  step 16", at=0.5), "block-1"))
    run_log.finish(read_api=False)
    assert shown == [f"{_local(0.5)} block-1: end of epoch 3  step 16", f"{_local(1)} block-1: block 1 done in 0.3 s",
                     f"{_local(2)} lineage demo: trained 4 epoch(s)"]


def test_a_line_is_held_back_until_older_than_the_hold_and_a_record_seen_twice_is_shown_once():
    shown: list[str] = []
    run_log = RunLog(show=shown.append, hold_s=1.5)
    record = logging.makeLogRecord({"name": "prefect.task_runs", "levelno": logging.INFO, "msg": "block 0 done",
                                    "created": T0.timestamp(), "task_run_name": "block-0"})
    run_log.add_local(record)  # a task run in this process: its record reaches the API too
    run_log.add(from_log(_log("block 0 done"), "block-0"))
    run_log.release(older_than=T0.timestamp() - 1)
    assert shown == []
    run_log.release(older_than=T0.timestamp())
    assert shown == [f"{_local(0)} block-0: block 0 done"]
    assert from_record(record).task == "block-0"


def test_batons_own_warnings_in_this_process_are_caught_by_the_handler_and_shown_at_the_end():
    shown: list[str] = []
    with RunLog(show=shown.append, hold_s=60) as run_log:
        logging.getLogger("baton.ckpt").warning("took over the lease of lineage demo from flow run a (h:1)")
        logging.getLogger("ray.train").warning("not Baton's")
        assert shown == []  # held back: a worker's earlier line may still be on its way
        run_log.finish(read_api=False)
    assert len(shown) == 1 and shown[0].endswith(" WARNING: took over the lease of lineage demo from flow run a (h:1)")
    logging.getLogger("baton.ckpt").warning("after the run")
    assert len(shown) == 1  # the handler is gone


def test_output_of_this_process_and_its_children_goes_to_the_log_and_not_to_the_terminal(tmp_path, capfd):
    log = tmp_path / "logs" / "train.log"
    child = ("import sys; print('(RayTrainWorker pid=1) Reporting training result 1: TrainingReport()'); "
             "print(\"06:47:19.612 | INFO    | Task run 'block-0' - block 0 done in 3.0 s\", file=sys.stderr)")
    with QuietOutput(log) as quiet:
        subprocess.run([sys.executable, "-c", child], check=True)
        os.write(2, b"Started a local Ray instance.\n")  # as C++ code and Ray's threads write
        quiet.stdout.write("to the terminal\n")
    text = log.read_text()
    assert "TrainingReport()" in text and "Started a local Ray instance." in text and "block 0 done" in text
    assert "to the terminal" not in text
    terminal = capfd.readouterr()
    assert "to the terminal" in terminal.out and "block 0 done" not in terminal.out + terminal.err


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


def test_off_a_terminal_progress_lines_take_their_place_among_the_run_lines_by_time(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    shown: list[str] = []
    run_log = RunLog(show=shown.append)
    monitor = TrainMonitor(store, "demo", epochs=1, console=Console(file=io.StringIO()), live=False)
    monitor.say = run_log.add_text
    monitor.poll()
    committed_at = datetime.now(timezone.utc)
    _commit(store, 0, 0.69314718)
    monitor.poll()  # the commit, seen before the block's line about it reached the API
    run_log.add(RunLine(committed_at, logging.INFO, "end of epoch 0  step 4  loss 0.6931", "block-0"))
    run_log.finish(read_api=False)
    assert len(shown) == 2 and "block-0: end of epoch 0" in shown[0] and "progress: epoch 1 of 1" in shown[1], shown


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
    assert "4 of 4 (2 trained in 1 block(s))" in text and "48.2s" in text
    assert str(tmp_path / "train.log") in text and "000003-0000000016" in text
    assert len(text.splitlines()) <= 8


def _rendered(monitor: TrainMonitor, width: int = 160) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(monitor.progress)
    return console.export_text()


def test_on_a_terminal_rich_progress_shows_a_bar_epochs_step_loss_time_since_the_last_commit_eta_and_elapsed(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    monitor = TrainMonitor(store, "demo", epochs=4, console=Console(file=io.StringIO()), live=True)
    monitor.poll()
    line = _rendered(monitor)
    assert line.startswith("demo ") and "epoch 0/4" in line and "nothing committed yet" in line and "ETA -" in line, line
    _commit(store, 0, 0.69314718)
    monitor.poll()
    line = _rendered(monitor)
    assert "epoch 1/4" in line and "step 4" in line and "loss 0.6931" in line and "0.69314718" not in line, line
    assert "last commit 0s ago" in line and "ETA -" not in line and "elapsed 0:00:0" in line, line
    assert "━" in line  # rich's bar, a quarter full
    assert monitor.progress.tasks[0].completed == 1 and monitor.progress.tasks[0].total == 4
    narrow = _rendered(monitor, width=60)  # the step and loss give way: still one line, ETA and elapsed kept
    assert len(narrow.splitlines()) == 1 and "epoch 1/4" in narrow and "ETA" in narrow and "elapsed" in narrow, narrow


def test_one_duration_formatter_serves_the_terminal_and_the_retention_policy():
    from ckpt.retention import format_duration
    from flows import _terminal

    assert _terminal.format_duration is format_duration
    assert [format_duration(s) for s in (0, 48.234, 90, 125.4, 5400)] == ["0s", "48.2s", "1m30s", "2m5s", "1h30m"]


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
