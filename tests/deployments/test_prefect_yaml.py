"""One source of truth for the deployments: `deployments/prefect.yaml` (for `prefect deploy`) and
`baton serve` (deployments/serve.py) declare the same deployments, schedules and parameters."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from prefect.utilities.callables import get_parameter_defaults
from pydantic import BaseModel

import flows.cli
from deployments.serve import NIGHTLY_CRON, build_deployments

YAML = Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml"


def _import(entrypoint: str):
    module, _, attr = entrypoint.rpartition(".")
    return getattr(__import__(module, fromlist=[attr]), attr)


def _effective(flow, parameters: dict) -> dict:
    """What a run gets: the flow's defaults under the deployment's parameters, models validated and
    dumped, and the store as given (serve makes it absolute, prefect.yaml keeps it relative)."""
    signature = inspect.signature(flow.fn)
    out = {}
    for name, value in {**get_parameter_defaults(flow.fn), **parameters}.items():
        annotation = signature.parameters[name].annotation
        model = flow.fn.__annotations__.get(name) if isinstance(annotation, str) else annotation
        model = eval(model, flow.fn.__globals__) if isinstance(model, str) else model
        if isinstance(model, type) and issubclass(model, BaseModel):
            value = model.model_validate(value).model_dump(mode="json", exclude_none=True)
            value.pop("store", None)
        out[name] = value
    return out


def _schedules(schedules) -> list[dict]:
    return [{"cron": s.cron, "timezone": s.timezone or "UTC"} for s in schedules]


def _from_yaml() -> dict[str, dict]:
    spec = yaml.safe_load(YAML.read_text())
    found = {}
    for d in spec["deployments"]:
        flow = _import(d["entrypoint"])
        found[f"{flow.name}/{d['name']}"] = {
            "entrypoint": d["entrypoint"], "description": d["description"], "tags": sorted(d["tags"]),
            "schedules": [{"cron": s["cron"], "timezone": s.get("timezone", "UTC")} for s in d.get("schedules", [])],
            "parameters": _effective(flow, d.get("parameters", {}))}
    return found


def _from_serve() -> dict[str, dict]:
    found = {}
    for d in build_deployments(store="./checkpoints"):
        flow = _import(d.entrypoint)
        found[f"{d.flow_name}/{d.name}"] = {
            "entrypoint": d.entrypoint, "description": d.description, "tags": sorted(d.tags),
            "schedules": _schedules(s.schedule for s in d.schedules),
            "parameters": _effective(flow, d.parameters)}
    return found


def test_prefect_yaml_and_baton_serve_declare_the_same_deployments():
    served, declared = _from_serve(), _from_yaml()
    assert sorted(served) == sorted(declared) == ["cleanup/nightly", "nightly-retrain/nightly", "train/on-demand"]
    for name in served:
        assert declared[name] == served[name], name


def test_nightly_retraining_and_cleanup_run_at_two_in_the_morning_utc_everywhere():
    assert NIGHTLY_CRON == "0 2 * * *"
    assert inspect.signature(flows.cli.serve).parameters["cron"].default.default == NIGHTLY_CRON
    for name, spec in _from_yaml().items():
        assert spec["schedules"] in ([], [{"cron": NIGHTLY_CRON, "timezone": "UTC"}]), name


@pytest.mark.parametrize("module", ["flows.train", "deployments.nightly"])
def test_each_flow_has_its_own_name(module):
    names = {"flows.train": "train", "deployments.nightly": "nightly-retrain"}
    flow = _import(f"{module}.{'train' if module == 'flows.train' else 'nightly_retrain'}")
    assert flow.name == names[module]
