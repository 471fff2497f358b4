"""A deployment run's partial config is merged over the served one, and flows read the
environment when they run, not when they are imported."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from ckpt import RetentionPolicy
from flows.cleanup import CleanupConfig
from flows.config import TrainConfig
from flows.served import describe, merge_over
from flows.train import FORWARDED_ENV, RayRunner, train

ROOT = Path(__file__).resolve().parents[2]


def test_a_partial_config_keeps_every_served_field_it_does_not_name():
    served = TrainConfig(store="s3://bucket/runs", storage_options={"endpoint_url": "http://s3:7480"},
                         recipe="tasks.recipes:digits", epochs=8).model_dump(mode="json", exclude_none=True)
    merged = TrainConfig.model_validate(merge_over(served, {"lineage": "x", "epochs": 1,
                                                            "storage_options": {"region_name": "eu"}}))
    assert merged.store == "s3://bucket/runs" and merged.recipe == "tasks.recipes:digits"
    assert merged.lineage == "x" and merged.epochs == 1
    assert merged.storage_options == {"endpoint_url": "http://s3:7480", "region_name": "eu"}


def test_a_partial_cleanup_policy_is_merged_rule_by_rule():
    served = CleanupConfig(store="/data/ckpts", policy=RetentionPolicy(keep_last=3, keep_best=2)).model_dump(mode="json")
    merged = CleanupConfig.model_validate(merge_over(served, {"policy": {"keep_last": 1}}))
    assert merged.store == "/data/ckpts" and merged.policy.keep_last == 1 and merged.policy.keep_best == 2


def test_the_logged_config_hides_storage_option_values():
    line = describe(TrainConfig(storage_options={"key": "AKIA-secret", "secret": "s3cr3t"}))
    assert "s3cr3t" not in line and "AKIA" not in line
    assert json.loads(line)["storage_options"] == {"key": "***", "secret": "***"}


def test_the_ray_runner_takes_the_environment_of_the_run_not_of_the_import(monkeypatch):
    assert isinstance(train.task_runner, RayRunner)
    assert "runtime_env" not in train.task_runner.init_kwargs  # nothing captured at import
    assert "AWS_ACCESS_KEY_ID" in FORWARDED_ENV
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "set-after-import")
    runner = train.task_runner.duplicate().configure()  # what the flow engine does as a run starts
    assert runner.init_kwargs["runtime_env"]["env_vars"]["AWS_ACCESS_KEY_ID"] == "set-after-import"
    assert runner.init_kwargs["namespace"] == "prefect"


@pytest.mark.parametrize("path, package", [("flows/train.py", "flows"), ("deployments/nightly.py", "deployments")])
def test_executing_a_flow_module_sets_no_ray_auth_mode(monkeypatch, path, package):
    """The module body runs again under a spare name, with a cluster address in the environment."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    spec = importlib.util.spec_from_file_location(f"{package}._import_check", ROOT / path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert "RAY_AUTH_MODE" not in os.environ
