"""`baton ckpt export STORE LINEAGE[@ID|@latest|@best|@ALIAS] --to model.safetensors [--dtype bf16]`:
a checkpoint's model weights as one safetensors file (consolidated from shards, unwrapped names),
for serving or another framework. Registered on `baton ckpt` by flows/ckpt_cli.py."""

from __future__ import annotations

import typer
from rich.console import Console

from ckpt import CheckpointError, CheckpointStore

# ckpt.export is imported when the command runs: torch.distributed.checkpoint would add seconds to
# every `baton` command's start.
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # ckpt.export.DTYPES

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def export(store: str = typer.Argument(..., help="Checkpoint store: folder or fsspec URL."),
           which: str = typer.Argument(..., metavar="LINEAGE[@ID|@latest|@best|@ALIAS]",
                                       help="Lineage, and which of its checkpoints (default: latest)."),
           to: str = typer.Option(..., "--to", help="The safetensors file to write (replaced if it exists)."),
           dtype: str = typer.Option(None, "--dtype", help=f"Cast floating-point weights: {', '.join(DTYPE_NAMES)}."),
           metric: str = typer.Option("loss", help="Metric that decides `best`."),
           mode: str = typer.Option("min", help="min or max, for `best`."),
           prefix: str = typer.Option("model.", help="Prefix of the model's tensors in a sharded checkpoint's "
                                                      "state dict (`ckpt.dcp.save({'model': ...})`).")) -> None:
    """Write a checkpoint's model weights, whole, as one safetensors file with the unwrapped module's
    parameter names (works for sharded and single-writer checkpoints; every file is verified)."""
    from ckpt.export import export_safetensors

    lineage, _, selector = which.partition("@")
    try:
        st = CheckpointStore(store)
        if not st.fs.exists(st.root):
            raise typer.BadParameter(f"no checkpoint store at {st.url}", param_hint="STORE")
        manifest = st.resolve(lineage, selector or "latest", metric=metric, mode=mode)  # type: ignore[arg-type]
        written = export_safetensors(st, manifest, to, dtype=dtype, prefix=prefix)
    except CheckpointError as err:
        err_console.print(str(err), style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"exported {lineage}/{manifest.id}: {written['tensors']} tensors, {written['bytes']} bytes "
                  f"-> {to}", markup=False, soft_wrap=True)
