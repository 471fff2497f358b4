"""Run by test_cleanup: which checkpoints does Ray Train's own CheckpointConfig keep?

For each case, reports one checkpoint per value of a metric sequence with
CheckpointConfig(num_to_keep=K, checkpoint_score_attribute="loss", checkpoint_score_order=ORDER)
and prints the indices of the checkpoints left on disk, as JSON (one list per case).
"""

import json
import os
import sys
import tempfile

import ray
import ray.train
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def loop(config):
    for index, loss in enumerate(config["losses"]):
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "index.json"), "w") as handle:
                json.dump(index, handle)
            ray.train.report({"loss": loss, "index": index},
                             checkpoint=ray.train.Checkpoint.from_directory(folder))


def kept_by_ray(losses, keep, order, storage) -> list[int]:
    trainer = TorchTrainer(
        loop, train_loop_config={"losses": losses}, scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="keep", storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute="loss",
                                                                checkpoint_score_order=order)))
    trainer.fit()
    kept = []
    for root, _, files in os.walk(storage):
        if "index.json" in files:
            with open(os.path.join(root, "index.json")) as handle:
                kept.append(json.load(handle))
    return sorted(kept)


def main() -> None:
    cases, storage = json.loads(sys.argv[1]), sys.argv[2]
    ray.init()
    results = [kept_by_ray(c["losses"], c["keep"], c["order"], os.path.join(storage, str(i)))
               for i, c in enumerate(cases)]
    print("KEPT " + json.dumps(results))


if __name__ == "__main__":
    main()
