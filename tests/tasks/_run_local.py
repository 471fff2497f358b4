"""Run every block of a config in this process (no Ray, no server), as `baton train` would:
`python -m tests.tasks._run_local STORE LINEAGE '{"loop": ..., ...}'`. Prints one JSON line of
timings. For kill tests (a real process to SIGKILL) and the GPU check."""

from __future__ import annotations

import json
import sys
import time


def main(store: str, lineage: str, fields: str) -> None:
    from flows.config import TrainConfig
    from tasks.runtime.worker import run_local

    started = time.perf_counter()
    config = TrainConfig(store=store, lineage=lineage, **json.loads(fields))
    reports: list[dict] = []
    for spec in config.blocks():
        run_local(spec, reports.append)
    print(json.dumps({"seconds": time.perf_counter() - started, "reports": reports}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
