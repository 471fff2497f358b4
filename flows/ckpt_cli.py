"""`baton ckpt ...`: inspect and manage a checkpoint store.

Imports neither Prefect nor Ray: these commands read the store directly and answer in about a
second, with no server.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from ckpt import CheckpointError, CheckpointStore, Manifest
from tasks.runtime.errors import TaskError

# Help texts are shown as written: rich markup would eat `[@ID|@latest|@best|@ALIAS]`.
app = typer.Typer(help="Inspect and manage committed checkpoints.", no_args_is_help=True,
                  rich_markup_mode=None)
console = Console()
err_console = Console(stderr=True, highlight=False)


def store_problem(store: CheckpointStore, lineage: str | None = None, create: bool = False) -> str | None:
    """Why `store` cannot be used, with the fix, or None. `create`: training, which makes a missing
    folder. Asks a remote store one question (it raises StoreUnreachable, naming the endpoint)."""
    if not store.is_local:
        if not create and not store.fs.exists(store.root):
            return _missing(store)
        return None
    if os.path.exists(store.root) and not os.path.isdir(store.root):
        return (f"{store.url} is a file, not a checkpoint store: give --store a folder (it is created if it does "
                "not exist) or an fsspec URL such as s3://bucket/runs")
    if not os.path.exists(store.root):
        return _cannot_create(store) if create else _missing(store)
    folder = store.path(lineage) if lineage else None
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder} is a file, where lineage {lineage} keeps its checkpoints: move it away"
    if create and not os.access(store.root, os.W_OK | os.X_OK):
        return f"cannot write to the checkpoint store {store.url}: give this user write access or another --store"
    return None


def _missing(store: CheckpointStore) -> str:
    return (f"no checkpoint store at {store.url}: check the path (a store is the folder or URL given to "
            "`baton train --store`, ./checkpoints by default)")


def _cannot_create(store: CheckpointStore) -> str | None:
    above = os.path.dirname(store.root)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        return f"cannot create the checkpoint store {store.url}: {above} is a file; give --store a folder"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"cannot create the checkpoint store {store.url}: {above} is not writable; give another --store"
    return None


def open_store(url: str, storage_options: dict | None = None) -> CheckpointStore:
    """An existing store, or a one-line error naming what is wrong with it (exit 2)."""
    store = CheckpointStore(url, storage_options)
    problem = store_problem(store)
    if problem:
        err_console.print(problem, style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2)
    return store


def _lineages(store: CheckpointStore, lineage: Optional[str]) -> list[str]:
    return [lineage] if lineage else store.lineages()


def _item(store: CheckpointStore, m: Manifest, problems: list[str], files: str) -> dict:
    return {"lineage": m.lineage, "id": m.id, "epoch": m.epoch, "step": m.step,
            "epochs_done": m.epochs_done, "uri": store.uri(m.lineage, m.id), "metrics": m.metrics,
            "created_at": m.created_at.isoformat(), "digest": m.digest, "bytes": m.total_bytes,
            "parent": m.parent, "files": files, "problems": problems}


def _checked(store: CheckpointStore, lineage: str, verify: bool) -> list[dict]:
    """The lineage's checkpoints, each with the problems of its files: every file hashed with
    `verify`; otherwise only their presence and sizes, from one listing of the lineage."""
    manifests = store.list(lineage)
    if verify:
        checked = [(m, store.verify(m), "verified") for m in manifests]
    else:
        sizes = _sizes(store, lineage)
        checked = [(m, _size_problems(store, m, sizes), "sizes ok") for m in manifests]
    return [_item(store, m, problems, "DAMAGED" if problems else files) for m, problems, files in checked]


def _sizes(store: CheckpointStore, lineage: str) -> dict[str, int]:
    found = store.fs.find(store.path(lineage), detail=True)
    return {path.rstrip("/"): int(info.get("size") or 0) for path, info in found.items()}


def _size_problems(store: CheckpointStore, m: Manifest, sizes: dict[str, int]) -> list[str]:
    problems = []
    for name, entry in sorted(m.files.items()):
        size = sizes.get(store.path(m.lineage, m.id, name))
        if size is None:
            problems.append(f"{name}: missing (expected {entry.size} bytes)")
        elif size != entry.size:
            problems.append(f"{name}: size {size} bytes, expected {entry.size}")
    return problems


# Baton's own errors, and a garbage metadata file: told in one line, never as a traceback.
BATON_ERRORS = (CheckpointError, TaskError, ValidationError, OSError)


def one_line(err: BaseException) -> str:
    if isinstance(err, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
        return f"invalid {err.title}: {problems}"
    if isinstance(err, OSError) and not isinstance(err, CheckpointError):
        return f"{type(err).__name__}: {err}"
    return str(err)


def guard(fn):
    """Baton's errors become a one-line message and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BATON_ERRORS as err:
            err_console.print(one_line(err), style="red", markup=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def _table(store: CheckpointStore, lineage: str, items: list[dict]) -> Table:
    # Ids are what a user copies into `show`, `pin` and `rm`: never cut. Other columns fold instead.
    width = max(len(it["id"]) for it in items)
    table = Table(title=f"{lineage} in {store.url}", title_justify="left")
    table.add_column("id", no_wrap=True, min_width=width, overflow="ignore")
    # Second, so that a narrow terminal, which crops the right of the table, still shows it.
    table.add_column("files", no_wrap=True, min_width=8)
    table.add_column("epoch", justify="right", min_width=5)
    table.add_column("step", justify="right", min_width=4)
    table.add_column("metrics", overflow="fold", min_width=12)
    table.add_column("created (UTC)", overflow="fold", min_width=10)
    table.add_column("digest", no_wrap=True, min_width=8)
    for it in items:
        metrics = "\n".join(f"{k}={v:.4g}" for k, v in sorted(it["metrics"].items()))
        files = "[bold red]DAMAGED[/bold red]" if it["problems"] else it["files"]
        table.add_row(it["id"], files, str(it["epoch"]), str(it["step"]), metrics,
                      it["created_at"][:19].replace("T", " "), it["digest"][:8])
    return table


@app.command("ls")
@guard
def ls(store: str = typer.Argument(..., help="Checkpoint store: folder or fsspec URL."),
       lineage: Optional[str] = typer.Option(None, help="Only this lineage (default: all)."),
       as_json: bool = typer.Option(False, "--json", help="Print every checkpoint as JSON."),
       verify: bool = typer.Option(False, "--verify", help="Hash every file (slower); without it, "
                                   "files are checked for presence and size only.")) -> None:
    """List committed checkpoints, oldest first, one table per lineage; damaged ones are marked."""
    st = open_store(store)
    by_lineage = {name: _checked(st, name, verify) for name in _lineages(st, lineage)}
    if as_json:
        print(json.dumps([it for items in by_lineage.values() for it in items], indent=2))
        return
    if not any(by_lineage.values()):
        console.print(f"no committed checkpoints in {st.url}" + (f" for lineage {lineage}" if lineage else ""),
                      markup=False, highlight=False)
        return
    for name, items in by_lineage.items():
        if items:
            console.print(_table(st, name, items))
    damaged = [it for items in by_lineage.values() for it in items if it["problems"]]
    for it in damaged:
        err_console.print(f"damaged: {it['lineage']}/{it['id']}: {'; '.join(it['problems'])}",
                          style="red", markup=False, soft_wrap=True)
    if damaged:
        err_console.print("training skips damaged checkpoints and re-commits them when it reaches them again; "
                          "cleanup never counts them as kept", markup=False, soft_wrap=True)
    elif not verify:
        err_console.print("file sizes checked; `--verify` (or `baton ckpt verify`) hashes every file",
                          markup=False, soft_wrap=True)


@app.command()
@guard
def show(store: str = typer.Argument(..., help="Checkpoint store: folder or fsspec URL."),
         lineage: str = typer.Argument(..., help="Lineage name."),
         which: str = typer.Argument("latest", help="ID, latest, best or an alias."),
         metric: str = typer.Option("loss", help="Metric that decides `best`."),
         mode: str = typer.Option("min", help="min or max, for `best`."),
         verify: bool = typer.Option(True, "--verify/--no-verify", help="Hash the checkpoint's files "
                                     "(default) or skip it for a quick look.")) -> None:
    """Show one checkpoint: its manifest, location and aliases, each fact once (JSON), and whether
    its files verify (a damaged one is also named on stderr, with its problems)."""
    st = open_store(store)
    manifest = st.resolve(lineage, which, metric=metric, mode=mode)
    problems = st.verify(manifest) if verify else None
    body = manifest.model_dump(mode="json")
    shown = {"lineage": body.pop("lineage"), "id": body.pop("id"), "epoch": manifest.epoch,
             "step": manifest.step, "epochs_done": manifest.epochs_done, "uri": st.uri(lineage, manifest.id),
             "aliases": [a for a, i in st.aliases(lineage).items() if i == manifest.id],
             "bytes": manifest.total_bytes,
             "verified": None if problems is None else not problems, "problems": problems or [], **body}
    print(json.dumps(shown, indent=2))
    if problems:
        err_console.print(f"damaged: {'; '.join(problems)}", style="red", markup=False, soft_wrap=True)
        good = st.latest_verified(lineage)
        err_console.print(f"the newest checkpoint of {lineage} whose files verify (where training resumes): "
                          f"{good.id if good else 'none'}", markup=False, soft_wrap=True)


@app.command()
@guard
def verify(store: str = typer.Argument(..., help="Checkpoint store: folder or fsspec URL."),
           lineage: Optional[str] = typer.Option(None, help="Only this lineage (default: all).")) -> None:
    """Check the size and hash of every committed file; exit 1 listing every failure."""
    st = open_store(store)
    problems, count = [], 0
    for name in _lineages(st, lineage):
        count += len(st.list(name))
        problems += st.verify_lineage(name)
    for problem in problems:
        console.print(f"[red]FAIL[/red] {problem}", highlight=False)
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]ok[/green]: {count} committed checkpoint(s) verified in {st.url}", highlight=False)


@app.command()
@guard
def pin(store: str = typer.Argument(..., help="Checkpoint store: folder or fsspec URL."),
        lineage: str = typer.Argument(..., help="Lineage name."),
        checkpoint: str = typer.Argument(..., help="Checkpoint id."),
        alias: str = typer.Option(..., "--alias", help="Alias name, e.g. production.")) -> None:
    """Pin a checkpoint under an alias (pinned checkpoints are never pruned)."""
    open_store(store).pin(lineage, checkpoint, alias)
    console.print(f"pinned {lineage}/{checkpoint} as {alias}", markup=False, highlight=False)


@app.command()
@guard
def unpin(store: str = typer.Argument(..., help="Checkpoint store: folder or fsspec URL."),
          lineage: str = typer.Argument(..., help="Lineage name."),
          alias: str = typer.Option(..., "--alias", help="Alias to remove.")) -> None:
    """Remove an alias."""
    open_store(store).unpin(lineage, alias)
    console.print(f"removed alias {alias} of {lineage}", markup=False, highlight=False)


@app.command()
@guard
def rm(store: str = typer.Argument(..., help="Checkpoint store: folder or fsspec URL."),
       lineage: str = typer.Argument(..., help="Lineage name."),
       checkpoint: str = typer.Argument(..., help="Checkpoint id."),
       force: bool = typer.Option(False, "--force", help="Also remove a pinned checkpoint.")) -> None:
    """Delete one checkpoint (manifest first, then its files)."""
    st = open_store(store)
    st.manifest(lineage, checkpoint)
    pinned = [a for a, i in st.aliases(lineage).items() if i == checkpoint]
    if pinned and not force:
        err_console.print(f"{lineage}/{checkpoint} is pinned as {', '.join(pinned)}; unpin it or pass --force",
                          style="red", markup=False)
        raise typer.Exit(2)
    freed = st.delete(lineage, checkpoint)
    console.print(f"deleted {lineage}/{checkpoint} ({freed} bytes)", markup=False, highlight=False)


from flows.ckpt_export import export  # noqa: E402  (its own module; registered here, under `baton ckpt`)

app.command("export")(export)
