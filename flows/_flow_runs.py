"""How `baton` runs a flow: what refuses the run before any work, the temporary Prefect server and
the local Ray started alongside, the stop signals while the flow runs, and the one line a failed or
cancelled run ends with."""

from __future__ import annotations

import contextlib
from typing import Optional

import typer
from rich.console import Console

from . import signals
from .ckpt_cli import BATON_ERRORS, one_line, store_problem

err_console = Console(stderr=True)


def refuse_before_work(config) -> None:
    """What makes the run impossible, told before a server, Ray or a worker group starts (exit 2):
    a store that cannot be used, a lineage another live run holds. The lease itself is taken by the
    flow: a run that starts meanwhile still loses the race there."""
    from ckpt import CheckpointStore, Lease

    lineage = config.resolved_lineage()
    try:
        store = CheckpointStore(config.store, config.storage_options)
        problem = store_problem(store, lineage, create=True)
        holder = None if problem else Lease.current(store, lineage)
    except BATON_ERRORS as err:
        problem = one_line(err)
    if problem is None and holder is not None and holder.holder_alive():
        problem = (f"lineage {lineage!r} is being trained by {holder.describe()}: nothing started. Wait for that run "
                   f"to finish, stop it (baton preempt {store.url} {lineage}), or train another lineage with "
                   f"--lineage; a dead holder's lease is taken over after its ttl ({holder.ttl_s:g} s).")
    if problem:
        err_console.print(problem, style="red", markup=False, soft_wrap=True, highlight=False)
        raise typer.Exit(2)
    signals.tell_where(lambda: _where_it_stands(store, lineage))


def _where_it_stands(store, lineage: str) -> str:
    latest = store.latest(lineage)
    if latest is None:
        return f"{lineage} has no committed checkpoint; the same command starts it from scratch"
    return (f"the latest committed checkpoint of {lineage} is {latest.id} (epoch {latest.epoch}, step "
            f"{latest.step}); the same command resumes there")


def run_flow(flow_fn, err: Optional[Console] = None, with_ray: bool = False, launched=None, **params):
    """Run a flow against PREFECT_API_URL, or a Prefect server started for this command (or
    `launched` earlier). `with_ray`: start the local Ray the flow's task runner needs while the
    server starts."""
    from ._server import ServerStartError, prefect_api

    err = err or err_console
    ray_started: list[bool] = []
    alongside = _ray_starter(ray_started, params.get("config")) if with_ray else None
    try:
        with prefect_api(alongside=alongside, launched=launched), _shutdown_ray_after(ray_started):
            return _flow_result(flow_fn, err, _run_stoppable(flow_fn, err, params))
    except ServerStartError as error:
        err.print(f"cannot start a Prefect server: {error}", style="red", markup=False)
        raise typer.Exit(1) from None


def _ray_starter(started: list[bool], config):
    from .train import prestart_group, start_local_ray

    def alongside() -> None:
        # Ray's GCS, raylet and dashboard join this process group: a terminal's hang-up must reach
        # `baton` only, which stops the run while Ray still runs (Ray already blocks SIGINT in them).
        with signals.children_ignore_hangup():
            started.append(start_local_ray())
        signals.reclaim()  # ray.init made SIGTERM a sys.exit
        if started[-1] and config is not None:
            prestart_group(config)
    return alongside


def _run_stoppable(flow_fn, err: Console, params: dict):
    """The flow's final state. From here on a first signal asks the flow run to stop."""
    signals.flow_started()
    try:
        return flow_fn(**params, return_state=True)
    except BaseException as error:  # Prefect's own SIGTERM bridge raises TerminationSignal
        signum = signals.signal_received()
        if signum is None or isinstance(error, (typer.Exit, Exception)):
            raise
        import signal as signal_module

        err.print(f"{flow_fn.name} stopped by {signal_module.Signals(signum).name} before training began",
                  style="yellow", markup=False, soft_wrap=True)
        raise typer.Exit(128 + signum) from None


def _flow_result(flow_fn, err: Console, state):
    if state.is_completed():
        return state.result()
    from .artifacts import error_text

    if state.is_cancelled():
        # Cancelled from the Prefect UI or API: the message says where it stopped.
        err.print(f"{flow_fn.name} cancelled: {state.message or state.name}", style="yellow",
                  markup=False, soft_wrap=True)
        raise typer.Exit(1)
    try:
        state.result()
        told = state.message or state.name
    except Exception as error:
        told = error_text(error)
    err.print(f"{flow_fn.name} failed: {told}", style="red", markup=False, soft_wrap=True)
    raise typer.Exit(1)


@contextlib.contextmanager
def _shutdown_ray_after(started: list[bool]):
    try:
        yield
    finally:
        if any(started):
            import ray

            ray.shutdown()
