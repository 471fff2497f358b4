"""Deployment runs: a run's partial parameter merged over the deployment's defaults.

Prefect merges a deployment run's parameters with the deployment's at the top level only: a run
started with `--params '{"config": {"lineage": "x"}}'` would replace the whole served `config`
(its store, storage options, recipe...). The flows merge it back, field by field, here.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

__all__ = ["merge_over", "served"]

Model = TypeVar("Model", bound=BaseModel)


def merge_over(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`given` over `defaults`, key by key; mappings on both sides are merged the same way."""
    merged = dict(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = merge_over(merged[key], value)
        merged[key] = value
    return merged


def _run_and_deployment_parameters() -> tuple[dict[str, Any], dict[str, Any]]:
    """The current flow run's parameters as given (JSON) and its deployment's; empty outside one."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if run_id is None:
        return {}, {}
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        if run.deployment_id is None:
            return {}, {}
        deployment = client.read_deployment(run.deployment_id)
    return dict(run.parameters or {}), dict(deployment.parameters or {})


def served(value: Model, name: str = "config") -> Model:
    """Parameter `name` of this flow run merged over its deployment's default; `value` itself
    when the run has no deployment, or the deployment no default for it."""
    given, defaults = _run_and_deployment_parameters()
    if not isinstance(defaults.get(name), dict) or not isinstance(given.get(name), dict):
        return value
    return type(value).model_validate(merge_over(defaults[name], given[name]))


def describe(config: BaseModel) -> str:
    """A config as one line of JSON for the logs; storage option values (credentials) hidden."""
    import json

    data = config.model_dump(mode="json", exclude_none=True)
    if isinstance(data.get("storage_options"), dict):
        data["storage_options"] = {key: "***" for key in data["storage_options"]}
    return json.dumps(data, sort_keys=True)
