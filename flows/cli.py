"""The `baton` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from .ckpt_cli import app as ckpt_app

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
    if not isinstance(data, dict):
        err_console.print(f"[red]config file {path} must hold a mapping of field: value[/red]")
        raise typer.Exit(2)
    return data.get("config", data)


def _json_flag(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        err_console.print(f"[red]{name} must be JSON, for example '{{\"epoch\": 1, \"batch\": 2}}': {err}[/red]")
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


@app.command()
def train(
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML file of config fields; flags win."),
    lineage: Optional[str] = typer.Option(None, help="Lineage name (default: derived from recipe and hyper-parameters)."),
    store: Optional[str] = typer.Option(None, help="Checkpoint store: folder or fsspec URL [default: ./checkpoints]."),
    epochs: Optional[int] = typer.Option(None, help="Total epochs [default: 4]."),
    epochs_per_block: Optional[int] = typer.Option(None, help="Epochs per block [default: 2]."),
    workers: Optional[int] = typer.Option(None, help="Ray Train workers [default: 2]."),
    recipe: Optional[str] = typer.Option(None, help="Recipe as module:attr [default: tasks.recipes:linear]."),
    seed: Optional[int] = typer.Option(None, help="Seed [default: 0]."),
    lr: Optional[float] = typer.Option(None, help="Learning rate [default: the recipe's]."),
    batch_size: Optional[int] = typer.Option(None, help="Per-worker batch size [default: the recipe's]."),
    checkpoint_every_steps: Optional[int] = typer.Option(None, help="Also checkpoint every N steps."),
    checkpoint_mode: Optional[str] = typer.Option(None, help="sync or async [default: sync]."),
    placement_strategy: Optional[str] = typer.Option(None, help="PACK, SPREAD, STRICT_PACK or STRICT_SPREAD [default: PACK]."),
    max_failures: Optional[int] = typer.Option(None, help="Ray Train worker-group restarts per block [default: 1]."),
    block_retries: Optional[int] = typer.Option(None, help="Prefect retries per block task [default: 1]."),
    init_from: Optional[str] = typer.Option(None, help="Warm start from LINEAGE[@ID|@latest|@best|@ALIAS]."),
    init_mode: Optional[str] = typer.Option(None, help="weights (fresh optimizer) or full [default: weights]."),
    fail: Optional[str] = typer.Option(None, help='Failure injection as JSON, e.g. \'{"epoch": 1, "batch": 2, "action": "kill-worker"}\'.'),
    sample_log: Optional[str] = typer.Option(None, help="Folder for a per-rank log of the samples trained."),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Existing Ray cluster (default: start a local one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the config and block plan; train nothing."),
) -> None:
    """Train a lineage to --epochs, resuming from its latest committed checkpoint."""
    flags = dict(lineage=lineage, store=store, epochs=epochs, epochs_per_block=epochs_per_block,
                 workers=workers, recipe=recipe, seed=seed, lr=lr, batch_size=batch_size,
                 checkpoint_every_steps=checkpoint_every_steps, max_failures=max_failures,
                 block_retries=block_retries, checkpoint_mode=checkpoint_mode,
                 placement_strategy=placement_strategy, init_from=init_from, init_mode=init_mode,
                 fail=_json_flag("--fail", fail) if fail else None, sample_log=sample_log)
    config = build_config(config_file, flags)
    if dry_run:
        plan = [{"block": b.index, "epochs": [b.start_epoch, b.end_epoch - 1]} for b in config.blocks()]
        print(json.dumps({"lineage": config.resolved_lineage(), "config": config.model_dump(mode="json"),
                          "blocks": plan}, indent=2))
        return
    if ray_address:
        os.environ["RAY_ADDRESS"] = ray_address
    if os.environ.get("RAY_ADDRESS"):
        # Ray 2.60 clusters have token authentication on; a driver must say so to connect.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from .train import train as train_flow

    summary = _run_flow(train_flow, config=config)
    if as_json:
        print(summary.model_dump_json(indent=2))
        return
    final = summary.final
    console.print(f"[bold green]lineage {summary.lineage}[/bold green]: trained {summary.epochs_trained} "
                  f"epoch(s) in {summary.wall_time_s:.1f} s, at epoch {final.epochs_done if final else 0} "
                  f"of {summary.epochs}")
    if final:
        console.print(f"final checkpoint {final.id}: {json.dumps(final.metrics)}\n  {final.uri}")


def _run_flow(flow_fn, **params):
    """Run a flow against PREFECT_API_URL, or a Prefect server started for this command."""
    from ._server import prefect_api

    with prefect_api():
        state = flow_fn(**params, return_state=True)
        if not state.is_completed():
            err_console.print(f"[red]{flow_fn.name} failed: {state.message}[/red]")
            try:
                state.result()
            except Exception as err:
                err_console.print(f"[red]{type(err).__name__}: {err}[/red]")
            raise typer.Exit(1)
        return state.result()


@app.command()
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
    """Serve every deployment (train/on-demand, train/nightly-retrain, cleanup/nightly) from one process."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        err_console.print("[red]baton serve needs a Prefect server: start one (prefect server start) and set "
                          "PREFECT_API_URL (for example http://127.0.0.1:4200/api), or prefect config set it.[/red]")
        raise typer.Exit(2)
    config = build_config(config_file, {"store": store}) if config_file else None
    from deployments.serve import serve_all  # deployments build on flows, so imported only here

    serve_all(store=store or "./checkpoints", cron=cron, interval_s=interval, config=config, limit=limit)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
