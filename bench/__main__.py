"""`python -m bench [--quick] [--json] [--only NAME ...] [--dir PATH]`: run the suite, print a table."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict

from ._common import MiB, Result

SUITE = ("save_vs_disk", "async_stall_vs_sync", "resume_vs_fresh", "cleanup_10k_s", "cleanup_dry_run_1k_s", "flow_vs_plain", "loop_vs_plain", "blocks_vs_one_fit",
         "notice_to_commit_s", "sharded_save_vs_dcp")


def _machine() -> dict[str, str]:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": model, "cores": str(os.cpu_count()), "memory_GiB": f"{memory:.0f}", "python": platform.python_version()}


def run(names: list[str], quick: bool, where: str | None) -> list[Result]:
    from . import cleanup, flow, loop, preempt, resume, sharded, storage, warm

    results: list[Result] = []
    for name in names:
        started = time.perf_counter()
        print(f"... {name}", file=sys.stderr, flush=True)
        if name == "save_vs_disk":
            results += storage.save_and_load((256 if quick else 1024) * MiB, reps=4 if quick else 6, where=where)
        elif name == "async_stall_vs_sync":
            results.append(storage.async_stall(256 * MiB, saves=3 if quick else 5, where=where))
        elif name == "flow_vs_plain":
            results.append(flow.flow_vs_plain(blocks=2 if quick else 4, reps=1 if quick else 2))
        elif name == "resume_vs_fresh":
            results.append(resume.resume_vs_fresh(reps=1 if quick else 2, where=where))
        elif name == "blocks_vs_one_fit":  # also block_boundary_s, first_step_vs_plain, rerun_noop_s
            results += warm.blocks_vs_one_fit(reps=1 if quick else 2)
        elif name == "loop_vs_plain":
            results.append(loop.loop_vs_plain(reps=1 if quick else 3))
        elif name == "cleanup_10k_s":
            results.append(cleanup.cleanup(where=where))
        elif name == "cleanup_dry_run_1k_s":
            results.append(cleanup.cleanup_dry_run_cli(where=where))
        elif name == "sharded_save_vs_dcp":  # also sharded_load_vs_dcp
            results += sharded.sharded_vs_dcp((256 if quick else 1024) * MiB, reps=2 if quick else 4, where=where)
        elif name == "notice_to_commit_s":
            results.append(preempt.notice_to_commit(reps=3 if quick else 7))
        else:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(SUITE)}")
        print(f"    {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return results


def _table(results: list[Result]) -> str:
    rows = [("benchmark", "value", "goal", "ok", "details")]
    for r in results:
        ok = "-" if r.passed is None else ("yes" if r.passed else "NO")
        value = f"{r.value:.1f} s" if r.unit == "s" else f"{r.value:.3f}"
        detail = ", ".join(f"{k}={v}" for k, v in r.detail.items() if not isinstance(v, dict))
        rows.append((r.name, value, r.goal, ok, detail))
        rows += [("", "", "", "", f"  {k}: {v}") for k, v in r.detail.items() if isinstance(v, dict)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (under 10 minutes)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--only", nargs="+", choices=SUITE, help="run only these benchmarks")
    parser.add_argument("--dir", default=None, help="folder for the storage benchmarks (default: the temp dir)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run(list(args.only or SUITE), args.quick, args.dir)
    if args.json:
        print(json.dumps({"machine": _machine(), "quick": args.quick, "seconds": round(time.perf_counter() - started),
                          "results": [asdict(r) for r in results]}, indent=1))
    else:
        print(f"machine: {_machine()}  quick: {args.quick}  took {time.perf_counter() - started:.0f} s")
        print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
