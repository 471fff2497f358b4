"""The `baton` command line."""

from __future__ import annotations

import os
import signal
import sys


def _stopped_while_importing(signum: int, frame) -> None:
    # Nothing is started yet: there is nothing to stop, and a KeyboardInterrupt would print a traceback.
    os.write(2, f"baton: {signal.Signals(signum).name}: stopped during start-up, before training began\n".encode())
    os._exit(128 + signum)


_AS_COMMAND = os.path.basename(sys.argv[0]) == "baton"
if _AS_COMMAND:  # the `baton` command, not a process that merely imports this module (the tests)
    for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(_sig, _stopped_while_importing)

from . import signals  # noqa: E402

if _AS_COMMAND:
    # Baton's handlers from here on, before typer, pydantic or torch are imported (a Ctrl-C while
    # torch imports is then one line, not a KeyboardInterrupt traceback).
    signals.install()

import inspect  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import typer  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from rich.console import Console  # noqa: E402

from ._flow_runs import refuse_before_work, run_flow as _run_flow  # noqa: E402
from ._process import stop_descendants  # noqa: E402
from .ckpt_cli import BATON_ERRORS, guard, one_line, open_store  # noqa: E402
from .ckpt_cli import app as ckpt_app  # noqa: E402

# Help texts are shown as written: rich markup would eat `[@ID|@latest|@best|@ALIAS]` and `[default: ...]`.
app = typer.Typer(help="Baton: PyTorch training in epoch blocks on Ray, orchestrated by Prefect, "
                  "resumable from any interruption.", no_args_is_help=True, add_completion=False,
                  rich_markup_mode=None)
app.add_typer(ckpt_app, name="ckpt")
console = Console()
err_console = Console(stderr=True)


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        err_console.print(f"[red]cannot read config file {path}: {err}[/red]")
        raise typer.Exit(2) from err
    fields = data.get("config", data) if isinstance(data, dict) else data
    if not isinstance(fields, dict):
        err_console.print(f"config file {path} must hold a mapping of field: value (at top level or under "
                          f"`config:`), not {type(fields).__name__} {fields!r}", style="red", markup=False)
        raise typer.Exit(2)
    return fields


def _json_flag(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        err_console.print(f"{name} must be JSON (for example '{{\"key\": 1}}'): {err}", style="red", markup=False)
        raise typer.Exit(2) from None


def build_config(file: Optional[Path], flags: dict[str, Any]):
    """YAML file first, flags on top; every error names its field."""
    from .config import TrainConfig

    values = _load_yaml(file) if file else {}
    if os.environ.get("BATON_FAIL") and "fail" not in values:
        values["fail"] = _json_flag("BATON_FAIL", os.environ["BATON_FAIL"])
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        _print_errors(err)
        raise typer.Exit(2) from None


def _print_errors(err: ValidationError) -> None:
    err_console.print("[red]invalid configuration:[/red]")
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "config"
        err_console.print(f"  [bold]{field}[/bold]: {problem['msg']} (got {problem.get('input')!r})")
    err_console.print("Fix the flag (--field-name) or the key in the --config file.")


def _flag_type(annotation: Any) -> tuple[type, str]:
    """The flag type of a config field, and a note for its help: plain values as themselves,
    choices as text, models and mappings as JSON."""
    import types
    import typing

    inner = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(inner) is typing.Literal:
        return str, "one of " + ", ".join(map(str, typing.get_args(inner)))
    if inner in (int, float, str, bool):
        return inner, ""
    return str, "JSON"


def _default_text(field) -> str:
    if field.default_factory is not None or field.default is None:
        return ""
    value = field.default.value if hasattr(field.default, "value") else field.default
    return f" [default: {value}]"


def _config_flags() -> list[inspect.Parameter]:
    """One --flag per TrainConfig field, with the field's type, description and default: a new
    setting is a new field, and the command line has it."""
    from .config import TrainConfig

    params = []
    for name, field in TrainConfig.model_fields.items():
        kind, note = _flag_type(field.annotation)
        text = (field.description or "") + (f" ({note})" if note else "") + _default_text(field)
        flag = f"--{name.replace('_', '-')}"
        if kind is bool:
            flag = f"{flag}/--no-{name.replace('_', '-')}"
        option = typer.Option(None, flag, help=text, show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[kind]))
    return params


def _json_fields() -> set[str]:
    from .config import TrainConfig

    return {name for name, field in TrainConfig.model_fields.items() if _flag_type(field.annotation)[1] == "JSON"}


def _train(config_file: Optional[Path] = None, ray_address: Optional[str] = None, as_json: bool = False,
           dry_run: bool = False, verbose: bool = False, **fields: Any) -> None:
    """Train a lineage to --epochs, resuming from its latest committed checkpoint."""
    json_fields = _json_fields()
    flags = {k: (_json_flag(f"--{k.replace('_', '-')}", v) if k in json_fields and v is not None else v)
             for k, v in fields.items()}
    config = build_config(config_file, flags)
    if dry_run:
        plan = [{"block": b.index, "epochs": [b.start_epoch, b.end_epoch - 1]} for b in config.blocks()]
        print(json.dumps({"lineage": config.resolved_lineage(), "config": config.model_dump(mode="json"),
                          "blocks": plan}, indent=2))
        return
    refuse_before_work(config)
    from ._server import launch_temporary_server
    from ._terminal import default_log_path

    # The Prefect server takes the longest to start: launch it before anything heavy is imported,
    # wait for it when the flow starts (and stop it at once if there is nothing to train).
    log_path = None if verbose else default_log_path(config.resolved_lineage())
    launched = launch_temporary_server(log_path)
    from .config import already_trained

    finished = already_trained(config)
    if finished is not None:  # a rerun of a finished lineage: no server wait, no Ray
        if launched is not None:
            launched.stop()
        console.print(f"{finished.lineage} already has {finished.epochs} epoch(s): nothing to train",
                      markup=False, highlight=False)
        _print_summary(console, finished, as_json, None)
        return
    if ray_address:
        os.environ["RAY_ADDRESS"] = ray_address
    if os.environ.get("RAY_ADDRESS"):
        # Ray 2.60 clusters have token authentication on; a driver must say so to connect.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if verbose:
        from .train import train as train_flow

        _print_summary(console, _run_flow(train_flow, with_ray=True, launched=launched, config=config), as_json, None)
        return
    _train_quietly(config, as_json, log_path, launched)


def _train_quietly(config, as_json: bool, log_path: Path, launched=None) -> None:
    """Ray's and Prefect's own output to a log file; Baton's lines, a progress display and the
    summary to the terminal (live on a terminal, plain lines otherwise)."""
    from ckpt import CheckpointStore

    from ._run_log import RunLog
    from ._terminal import QuietOutput, TrainMonitor

    lineage = config.resolved_lineage()
    quiet = QuietOutput(log_path)
    failed: BaseException | None = None
    with quiet:
        out, err = Console(file=quiet.stdout), Console(file=quiet.stderr)
        err.print(f"baton train {lineage}: Ray and Prefect output goes to {log_path} (--verbose shows it here)",
                  markup=False, highlight=False, style="dim", soft_wrap=True)
        store = None
        try:
            store = CheckpointStore(config.store, config.storage_options)
            monitor = TrainMonitor(store, lineage, config.epochs, err, live=err.is_terminal)
            # The run's lines from its log records (this process's and, through the API, the block
            # tasks'), in time order, all shown before the summary.
            with monitor, RunLog(show=monitor.print) as run_log:
                monitor.say = run_log.add_text  # progress lines in their place among the run's
                from .train import train as train_flow

                summary = _run_flow(run_log.around(train_flow), err=err, with_ray=True, launched=launched,
                                    config=config)
        except (typer.Exit, Exception, KeyboardInterrupt) as caught:
            failed = caught
    if failed is not None:
        if not isinstance(failed, (typer.Exit, KeyboardInterrupt)):
            err.print(f"baton train failed: {type(failed).__name__}: {failed}", style="red", markup=False)
        _tell_resume_point(err, store, lineage)
        err.print(f"full log: {log_path}", markup=False, highlight=False, soft_wrap=True)
        if isinstance(failed, (typer.Exit, KeyboardInterrupt)):
            raise failed
        raise typer.Exit(1)
    _print_summary(out, summary, as_json, log_path)


def _tell_resume_point(err: Console, store, lineage: str) -> None:
    if store is None:
        return
    try:
        latest = store.latest(lineage)
    except Exception:  # the store is what failed: the error above says so
        return
    where = (f"the latest committed checkpoint of {lineage} is {latest.id} (epoch {latest.epoch}, step "
             f"{latest.step}); the same command resumes there" if latest else
             f"{lineage} has no committed checkpoint; the same command starts it from scratch")
    err.print(where, markup=False, highlight=False, soft_wrap=True)


def _print_summary(out: Console, summary, as_json: bool, log_path: Optional[Path]) -> None:
    if as_json:
        out.file.write(summary.model_dump_json(indent=2) + "\n")
        return
    from ._terminal import summary_table

    out.print(summary_table(summary, log_path))


def _register_train() -> None:
    fixed = [
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", help="YAML file of config fields; flags win.")),
        inspect.Parameter("ray_address", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, envvar="RAY_ADDRESS",
                                               help="Existing Ray cluster (default: start a local one).")),
        inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--json", help="Print the summary as JSON.")),
        inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--dry-run", help="Validate and print the config and "
                                               "block plan; train nothing.")),
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--verbose", "-v", help="Show Ray's and Prefect's own "
                                               "output too (by default it goes to a log file the summary names).")),
    ]
    params = fixed + _config_flags()

    def train(**kwargs: Any) -> None:
        _train(**kwargs)

    train.__doc__ = _train.__doc__
    train.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train.__annotations__ = {p.name: p.annotation for p in params}
    app.command(name="train")(train)


_register_train()

@app.command()
@guard
def cleanup(
    store: str = typer.Argument(..., help="Checkpoint store: folder or fsspec URL."),
    lineage: Optional[str] = typer.Option(None, help="Only this lineage (default: all)."),
    keep_last: Optional[int] = typer.Option(None, help="Keep the N newest checkpoints of each lineage."),
    keep_best: Optional[int] = typer.Option(None, help="Keep the K best by --metric/--mode."),
    metric: str = typer.Option("loss", help="Metric for --keep-best."),
    mode: str = typer.Option("min", help="min or max, for --keep-best."),
    keep_every: Optional[int] = typer.Option(None, help="Keep one checkpoint per N epochs."),
    min_age: Optional[str] = typer.Option(None, help="Never delete younger checkpoints (90s, 10m, 2h, 7d)."),
    uncommitted_ttl: Optional[str] = typer.Option(None, help="Remove uncommitted leftovers older than this [default: 1h]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and report; delete nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print every decision as JSON."),
) -> None:
    """Prune checkpoints by a retention policy. Always kept: the latest of each lineage, pinned
    checkpoints, and those a live training run may be using. With a Prefect server (PREFECT_API_URL)
    it runs as the `cleanup` flow and publishes its decisions; without one, it prunes directly."""
    from .cleanup import CleanupConfig

    policy = {k: v for k, v in dict(keep_last=keep_last, keep_best=keep_best, metric=metric, mode=mode,
                                    keep_every=keep_every, min_age=min_age,
                                    uncommitted_ttl=uncommitted_ttl).items() if v is not None}
    try:
        config = CleanupConfig.model_validate(dict(store=store, lineage=lineage, policy=policy, dry_run=dry_run))
    except ValidationError as err:
        _print_errors(err)
        raise typer.Exit(2) from None
    open_store(config.store)  # a store that is not there is named, not pruned of nothing
    from prefect.settings import get_current_settings

    from .cleanup import cleanup as cleanup_flow, prune_here

    # With a Prefect server, the flow run publishes its decisions (artifacts) and logs each one;
    # without one, the prune runs here, once, and this command prints each decision.
    as_flow = bool(get_current_settings().api.url)
    result = _run_flow(cleanup_flow, config=config) if as_flow else prune_here(config)
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    for d in [] if as_flow else result.deleted:
        console.print(f"{verb} {d.lineage}/{d.id}: {'; '.join(d.reasons)}", markup=False, highlight=False)
    console.print(f"{verb} {len(result.deleted)}, kept {len(result.kept)}, "
                  f"{'would free' if dry_run else 'freed'} {result.bytes_freed:,} bytes")


@app.command()
def serve(
    store: Optional[str] = typer.Option(None, help="Store of the deployments' default configs (default: ./checkpoints)."),
    cron: str = typer.Option("0 2 * * *", help="Schedule of nightly retraining and cleanup (cron, UTC)."),
    interval: Optional[float] = typer.Option(None, help="Retrain every N seconds instead of by --cron "
                                             "(drills and tests); lineage names then carry the time too."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML file: the default training config "
                                               "of train/on-demand and train/nightly-retrain."),
    limit: Optional[int] = typer.Option(None, help="At most N flow runs at once (default: no limit)."),
) -> None:
    """Serve every deployment (train/on-demand, nightly-retrain/nightly, cleanup/nightly) from one process."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        err_console.print("[red]baton serve needs a Prefect server: start one (prefect server start) and set "
                          "PREFECT_API_URL (for example http://127.0.0.1:4200/api), or prefect config set it.[/red]")
        raise typer.Exit(2)
    config = build_config(config_file, {"store": store}) if config_file else None
    if os.environ.get("RAY_ADDRESS"):
        # Ray reads it when imported, in the flow-run subprocesses that inherit this environment.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from deployments.serve import serve_all  # deployments build on flows, so imported only here

    signals.uninstall()  # Prefect's runner stops its flow runs on SIGTERM and SIGINT itself
    serve_all(store=store or "./checkpoints", cron=cron, interval_s=interval, config=config, limit=limit)


@app.command()
@guard
def preempt(
    store: str = typer.Argument(..., help="Checkpoint store: folder or fsspec URL."),
    lineage: str = typer.Argument(..., help="The lineage being trained."),
    reason: str = typer.Option("preempt command", help="Why (shown in the run's log)."),
) -> None:
    """Ask the run training LINEAGE to checkpoint the step it is at and stop (for a spot-instance
    notice handler or a Kubernetes preStop hook); a rerun or Retry resumes there."""
    from ckpt import Lease
    from tasks.runtime.stop import give_notice

    st = open_store(store)
    holder = Lease.current(st, lineage)
    if holder is None or not holder.holder_alive():
        err_console.print(f"no run is training {lineage} in {st.url} (no live lease): nothing to preempt",
                          style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    give_notice(st, lineage, holder.fence, reason)
    console.print(f"notice given to {holder.describe()}", markup=False, highlight=False)


def main() -> None:
    """The `baton` executable: Baton's errors as one line wherever they come from; whatever the
    command started and left running is stopped before it returns."""
    signals.install()
    try:
        app()
    except BATON_ERRORS as err:
        err_console.print(one_line(err), style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:  # only where no handler of ours was installed (another thread)
        sys.exit(130)
    finally:
        stop_descendants()


if __name__ == "__main__":
    main()
