"""The one place a Ray Train `TorchTrainer` is built for a block (a fresh fit, or a warm group's
long fit): Baton's worker entry, the block's scaling, its Ray Data sets, a run name and Ray
Train's own worker recovery (`max_failures`)."""

from __future__ import annotations

import uuid
from typing import Any

from .runtime.spec import BlockSpec
from .runtime.worker import importable, load_loop, worker_loop

# Ray Train drains each worker's report queue once per health-check interval (2 s by default),
# which makes every `ray.train.report` cost ~2 s; 0.2 s keeps per-epoch reports cheap.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def scaling(spec: BlockSpec):
    from ray.train import ScalingConfig

    resources = {"CPU": spec.settings.cpus_per_worker}
    if spec.settings.gpus_per_worker:
        resources["GPU"] = spec.settings.gpus_per_worker
    # use_gpu picks NCCL and puts each worker on its own device (ray.train.torch.get_device()).
    return ScalingConfig(num_workers=spec.settings.workers, use_gpu=spec.settings.gpus_per_worker > 0,
                         resources_per_worker=resources, placement_strategy=spec.settings.placement_strategy)


def datasets(spec: BlockSpec) -> dict[str, Any] | None:
    """Ray Data sets named in the config, built on the driver and split over the workers by Ray Train."""
    if not spec.settings.datasets:
        return None
    importable(spec.import_paths)
    return {name: load_loop(path)(spec.params) for name, path in spec.settings.datasets.items()}


def build_trainer(spec: BlockSpec, kind: str):
    """A `TorchTrainer` running `spec`'s loop; `kind` names the run (`block3`, `warm`)."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        worker_loop, train_loop_config=spec.model_dump(mode="json"), scaling_config=scaling(spec),
        datasets=datasets(spec),
        run_config=RunConfig(name=f"baton-{spec.lineage}-{kind}-{uuid.uuid4().hex[:8]}",
                             failure_config=FailureConfig(max_failures=spec.settings.max_failures)))
