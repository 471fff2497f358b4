"""flow_vs_plain: a K-block Baton flow against K plain `TorchTrainer.fit` calls, same workers.

Starts its own Prefect server and Ray cluster (`ray start`, token auth) with an isolated HOME and
PREFECT_HOME, as the integration tests do, and runs both sides as fresh processes, alternately.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from ._common import Result, median

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def cluster(work: Path):
    """A Prefect server and a Ray cluster; yields the environment for processes that use them."""
    home = work / "home"
    home.mkdir(parents=True)
    env = dict(os.environ, HOME=str(home), PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token",
               BATON_BENCH_TIMES=str(work / "times.jsonl"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for key in ("PREFECT_API_URL", "RAY_ADDRESS"):
        env.pop(key, None)
    port = _free_port()
    log = (work / "prefect.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    head = None
    try:
        _wait_http(env["PREFECT_API_URL"] + "/health", 120)
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
        ray_port = _free_port()
        # `--block` keeps the cluster's processes in this process group, so the benchmark stops its
        # own cluster only; `ray stop --force` would stop every Ray cluster on the machine.
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={ray_port}", "--num-cpus=4",
                                 "--include-dashboard=false", "--disable-usage-stats",
                                 f"--temp-dir={tempfile.mkdtemp(prefix='rb', dir='/tmp')}"],
                                env=env, stdout=(work / "ray.log").open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        env["RAY_ADDRESS"] = f"127.0.0.1:{ray_port}"
        _wait_ray(env, head, work / "ray.log")
        yield env
    finally:
        for proc in (head, server):
            if proc is not None:
                _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(20)
    except ProcessLookupError:
        pass


def _wait_ray(env: dict, head: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        if subprocess.run([str(BIN / "ray"), "status", "--address", env["RAY_ADDRESS"]], env=env,
                          capture_output=True, timeout=60).returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"Ray did not start within {timeout} s:\n{log.read_text()[-3000:]}")


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def _times(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _boundaries(events: list[dict], starts: list[float]) -> dict[str, float]:
    """Per block (rank 0): start of the block -> worker loop entry -> first step; last step -> next start."""
    by_pid: dict[int, list[dict]] = {}
    for e in events:
        by_pid.setdefault(e["pid"], []).append(e)
    blocks = sorted(by_pid.values(), key=lambda es: es[0]["t"])
    to_enter, to_first, after_last = [], [], []
    for i, es in enumerate(blocks):
        enter = min(e["t"] for e in es if e["event"] == "enter")
        steps = [e["t"] for e in es if e["event"] == "step"]
        if i < len(starts):
            to_enter.append(enter - starts[i])
        to_first.append(min(steps) - enter)
        if i + 1 < len(blocks):
            after_last.append(min(e["t"] for e in blocks[i + 1] if e["event"] == "enter") - max(steps))
    out = {"enter_to_first_step_s": median(to_first)}
    if to_enter:
        out["block_start_to_worker_entry_s"] = median(to_enter)
    if after_last:
        out["last_step_to_next_worker_entry_s"] = median(after_last)
    return out


def _baton(env: dict, work: Path, blocks: int, run: int) -> tuple[float, dict]:
    times = work / "times.jsonl"
    times.unlink(missing_ok=True)
    args = [str(BIN / "baton"), "train", "--store", str(work / f"baton-store-{run}"), "--lineage", f"bench{run}",
            "--recipe", "bench.recipes:timed_linear", "--epochs", str(blocks), "--epochs-per-block", "1",
            "--workers", "2"]
    started = time.perf_counter()
    out = subprocess.run(args, env=env, cwd=work, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"baton train failed:\n{out.stderr[-3000:]}")
    return wall, _boundaries(_times(times), [])


def _plain(env: dict, work: Path, blocks: int, run: int) -> tuple[float, dict]:
    times = work / "times.jsonl"
    times.unlink(missing_ok=True)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "bench._plain", env["RAY_ADDRESS"], str(work / f"plain-{run}"),
                          str(blocks)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"plain Ray Train failed:\n{out.stderr[-3000:]}")
    fits = json.loads(out.stdout.strip().splitlines()[-1])["fits"]
    return wall, _boundaries(_times(times), [f["start"] for f in fits])


def flow_vs_plain(blocks: int, reps: int) -> Result:
    work = Path(tempfile.mkdtemp(prefix="bf", dir="/tmp"))
    try:
        with cluster(work) as env:
            baton, plain, baton_b, plain_b = [], [], [], []
            for run in range(reps):
                wall, b = _plain(env, work, blocks, run)
                plain.append(wall)
                plain_b.append(b)
                wall, b = _baton(env, work, blocks, run)
                baton.append(wall)
                baton_b.append(b)
        ratio = median(baton) / median(plain)
        overhead = (median(baton) - median(plain)) / blocks
        return Result("flow_vs_plain", ratio, "<= 1.10", ratio <= 1.10, detail={
            "blocks": blocks, "workers": 2, "baton_s": round(median(baton), 1), "plain_s": round(median(plain), 1),
            "overhead_per_block_s": round(overhead, 2),
            "plain_boundaries": {k: round(v, 2) for k, v in plain_b[-1].items()},
            "baton_boundaries": {k: round(v, 2) for k, v in baton_b[-1].items()}},
            note="whole processes: `baton train` vs a script of TorchTrainer.fit calls, 1 epoch per block")
    finally:
        shutil.rmtree(work, ignore_errors=True)
