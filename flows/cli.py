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

app = typer.Typer(help="Baton: PyTorch training in epoch blocks on Ray, orchestrated by Prefect, "
                  "resumable from any interruption.", no_args_is_help=True, add_completion=False)
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
        err_console.print("[red]invalid training configuration:[/red]")
        for problem in err.errors():
            field = ".".join(str(p) for p in problem["loc"]) or "config"
            err_console.print(f"  [bold]{field}[/bold]: {problem['msg']} (got {problem.get('input')!r})")
        err_console.print("Fix the flag (--field-name) or the key in the --config file.")
        raise typer.Exit(2) from None


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
                 block_retries=block_retries, init_from=init_from, init_mode=init_mode,
                 fail=_json_flag("--fail", fail) if fail else None, sample_log=sample_log)
    config = build_config(config_file, flags)
    if dry_run:
        plan = [{"block": b.index, "epochs": [b.start_epoch, b.end_epoch - 1]} for b in config.blocks()]
        print(json.dumps({"lineage": config.resolved_lineage(), "config": config.model_dump(mode="json"),
                          "blocks": plan}, indent=2))
        return
    if ray_address:
        os.environ["RAY_ADDRESS"] = ray_address
    from ._server import prefect_api

    with prefect_api():
        from .train import train as train_flow

        state = train_flow(config=config, return_state=True)
        if not state.is_completed():
            err_console.print(f"[red]training failed: {state.message}[/red]")
            try:
                state.result()
            except Exception as err:
                err_console.print(f"[red]{type(err).__name__}: {err}[/red]")
            raise typer.Exit(1)
        summary = state.result()
    if as_json:
        print(summary.model_dump_json(indent=2))
        return
    final = summary.final
    console.print(f"[bold green]lineage {summary.lineage}[/bold green]: trained {summary.epochs_trained} "
                  f"epoch(s) in {summary.wall_time_s:.1f} s, at epoch {final.epochs_done if final else 0} "
                  f"of {summary.epochs}")
    if final:
        console.print(f"final checkpoint {final.id}: {json.dumps(final.metrics)}\n  {final.uri}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
