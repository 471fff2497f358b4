"""A cleanup process for the concurrent-cleanup tests.

    python tests/ckpt/_pruner.py STORE_URL KEEP_LAST

Prints ``ready`` once imported; then, for every line read on stdin (so that several processes start
together), runs `prune` over the whole store and prints ``ok`` or ``failed <the exception>`` on one
line. Exits at the end of stdin.
"""

from __future__ import annotations

import sys
import traceback

from ckpt import CheckpointStore, RetentionPolicy, prune


def main() -> None:
    url, keep_last = sys.argv[1], int(sys.argv[2])
    policy = RetentionPolicy(keep_last=keep_last, uncommitted_ttl="1s")
    print("ready", flush=True)
    for _ in sys.stdin:
        try:
            prune(CheckpointStore(url), policy)
        except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
            where = traceback.extract_tb(err.__traceback__)[-1]
            print(f"failed {err.__class__.__name__}: {err} at {where.filename}:{where.lineno}", flush=True)
            continue
        print("ok", flush=True)


if __name__ == "__main__":
    main()
