"""Every use of a private Prefect API, in one place, each guarded: `check()` (run by a fast test
against the pinned Prefect) fails loudly when an upgrade moved one, instead of an error swallowed
at run time. Nothing else in Baton reaches into `prefect._internal`, Prefect's server factory or
prefect-ray's runner attributes.

- `control_intent`: the intent ("cancel", ...) a Prefect runner acknowledges on a flow-run
  process's control channel just before it sends SIGTERM (prefect._internal.control_listener).
- `SERVER_APP_FACTORY`, `server_environment`: what Prefect's own `SubprocessASGIServer` runs (uvicorn
  on `prefect.server.api.server:create_app`), and the environment variables `create_app` reads to
  know it is a temporary server (`PREFECT__SERVER_EPHEMERAL`) and the last app of its process
  (`PREFECT__SERVER_FINAL`).
- `drain_log_and_event_workers`: Prefect's queue services (`APILogWorker`, `EventsWorker`) have a
  class method `drain_all` that ships what is queued; there is no public way.
- `set_ray_init_kwargs`: prefect-ray's `RayTaskRunner.__enter__` passes `self.init_kwargs` to
  `ray.init`; Baton's runner sets it when a flow run starts rather than when the flow is defined.

Imports nothing at module level: `control_intent` runs inside a signal handler.
"""

from __future__ import annotations

import inspect
import sys

CONTROL_LISTENER = "prefect._internal.control_listener"
SERVER_APP_FACTORY = "prefect.server.api.server:create_app"
_SERVER_FLAGS = ("PREFECT__SERVER_EPHEMERAL", "PREFECT__SERVER_FINAL")


def control_intent() -> str | None:
    """The control intent of this flow-run process, or None. Only where Prefect already runs: its
    control listener is imported when a flow run starts, and importing Prefect inside a signal
    handler would delay the notice by a second."""
    listener = sys.modules.get(CONTROL_LISTENER)
    return None if listener is None else listener.get_intent()


def server_environment() -> dict[str, str]:
    """Environment variables that make `create_app` build a temporary server's app."""
    return {flag: "1" for flag in _SERVER_FLAGS}


def drain_log_and_event_workers(timeout_s: float = 10.0) -> None:
    """Ship queued log records and events now, while the server still answers; afterwards they
    would retry against a closed port at exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s)


def set_ray_init_kwargs(runner, init_kwargs: dict) -> None:
    """The `ray.init` arguments `runner` (a prefect-ray RayTaskRunner) uses when it starts."""
    runner.init_kwargs = init_kwargs


def check() -> list[str]:
    """What of the above the installed Prefect and prefect-ray no longer have (empty: all there).
    Starts nothing."""
    import importlib

    problems = []
    try:
        listener = importlib.import_module(CONTROL_LISTENER)
        if not callable(getattr(listener, "get_intent", None)):
            problems.append(f"{CONTROL_LISTENER}.get_intent is gone")
    except ImportError as err:
        problems.append(f"{CONTROL_LISTENER} is gone: {err}")
    problems += _check_server()
    for module, name in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        worker = getattr(importlib.import_module(module), name, None)
        if not callable(getattr(worker, "drain_all", None)):
            problems.append(f"{module}.{name}.drain_all is gone")
    problems += _check_ray_runner()
    return problems


def _check_server() -> list[str]:
    # From the source, not by importing it: the server module loads all of Prefect's server (~10 s).
    import ast
    import importlib.util

    module_name, factory = SERVER_APP_FACTORY.split(":")
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return [f"{module_name} is gone"]
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == factory]
    if not found:
        return [f"{SERVER_APP_FACTORY} is gone"]
    read = {node.value for node in ast.walk(found[0]) if isinstance(node, ast.Constant)}
    return [f"{SERVER_APP_FACTORY} no longer reads {flag}" for flag in _SERVER_FLAGS if flag not in read]


def _check_ray_runner() -> list[str]:
    from prefect_ray import RayTaskRunner

    runner = RayTaskRunner(address="127.0.0.1:1", init_kwargs={"namespace": "x"})
    problems = []
    if getattr(runner, "address", None) != "127.0.0.1:1" or getattr(runner, "init_kwargs", {}).get("namespace") != "x":
        problems.append("prefect_ray.RayTaskRunner no longer keeps `address` and `init_kwargs` as attributes")
    if "self.init_kwargs" not in inspect.getsource(RayTaskRunner.__enter__):
        problems.append("prefect_ray.RayTaskRunner.__enter__ no longer passes self.init_kwargs to ray.init")
    return problems
