"""`baton ckpt ...`: inspect and manage a checkpoint store."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ckpt import CheckpointError, CheckpointStore, Manifest

app = typer.Typer(help="Inspect and manage committed checkpoints.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def _store(url: str) -> CheckpointStore:
    return CheckpointStore(url)


def _lineages(store: CheckpointStore, lineage: Optional[str]) -> list[str]:
    return [lineage] if lineage else store.lineages()


def _item(store: CheckpointStore, m: Manifest) -> dict:
    return {"lineage": m.lineage, "id": m.id, "epoch": m.epoch, "step": m.step,
            "epochs_done": m.epochs_done, "uri": store.uri(m.lineage, m.id), "metrics": m.metrics,
            "created_at": m.created_at.isoformat(), "digest": m.digest, "bytes": m.total_bytes,
            "parent": m.parent}


def _guard(fn):
    """Checkpoint errors become a one-line message and exit code 2, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CheckpointError as err:
            err_console.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
    return wrapper


@app.command("ls")
@_guard
def ls(store: str, lineage: Optional[str] = typer.Option(None), as_json: bool = typer.Option(False, "--json")) -> None:
    """List committed checkpoints, oldest first."""
    st = _store(store)
    items = [_item(st, m) for name in _lineages(st, lineage) for m in st.list(name)]
    if as_json:
        print(json.dumps(items, indent=2))
        return
    table = Table(title=f"checkpoints in {st.url}")
    for column in ("lineage", "id", "epoch", "step", "metrics", "created", "digest"):
        table.add_column(column)
    for it in items:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(it["metrics"].items()))
        table.add_row(it["lineage"], it["id"], str(it["epoch"]), str(it["step"]), metrics,
                      it["created_at"][:19], it["digest"][:12])
    console.print(table)


@app.command()
@_guard
def show(store: str, lineage: str, which: str = typer.Argument("latest", help="ID, latest, best or an alias."),
         metric: str = "loss", mode: str = "min") -> None:
    """Show one checkpoint's manifest."""
    st = _store(store)
    manifest = st.resolve(lineage, which, metric=metric, mode=mode)
    print(json.dumps({**_item(st, manifest), "manifest": manifest.model_dump(mode="json"),
                      "aliases": [a for a, i in st.aliases(lineage).items() if i == manifest.id]}, indent=2))


@app.command()
@_guard
def verify(store: str, lineage: Optional[str] = typer.Option(None)) -> None:
    """Check sizes and sha256 of every committed file; exit 1 listing every failure."""
    st = _store(store)
    problems, count = [], 0
    for name in _lineages(st, lineage):
        count += len(st.list(name))
        problems += st.verify_lineage(name)
    for problem in problems:
        console.print(f"[red]FAIL[/red] {problem}")
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]ok[/green]: {count} committed checkpoint(s) verified in {st.url}")


@app.command()
@_guard
def pin(store: str, lineage: str, checkpoint: str, alias: str = typer.Option(..., "--alias")) -> None:
    """Pin a checkpoint under an alias (pinned checkpoints are never pruned)."""
    _store(store).pin(lineage, checkpoint, alias)
    console.print(f"pinned {lineage}/{checkpoint} as {alias}")


@app.command()
@_guard
def unpin(store: str, lineage: str, alias: str = typer.Option(..., "--alias")) -> None:
    """Remove an alias."""
    _store(store).unpin(lineage, alias)
    console.print(f"removed alias {alias} of {lineage}")


@app.command()
@_guard
def rm(store: str, lineage: str, checkpoint: str, force: bool = typer.Option(False, "--force", help="Also remove a pinned checkpoint.")) -> None:
    """Delete one checkpoint (manifest first, then its files)."""
    st = _store(store)
    st.manifest(lineage, checkpoint)
    pinned = [a for a, i in st.aliases(lineage).items() if i == checkpoint]
    if pinned and not force:
        err_console.print(f"[red]{lineage}/{checkpoint} is pinned as {', '.join(pinned)}; unpin it or pass --force[/red]")
        raise typer.Exit(2)
    freed = st.delete(lineage, checkpoint)
    console.print(f"deleted {lineage}/{checkpoint} ({freed} bytes)")
