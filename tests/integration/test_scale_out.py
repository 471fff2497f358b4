"""Scale out (issue 8): an existing two-node Ray cluster started with `ray start`, the store on the
real S3 server, and a Prefect server on PostgreSQL.

The two Ray nodes run on this machine: a head (2 CPUs) and a worker node (1 CPU) that joins it with
`ray start --address=... --block`, each in its own process group, with token authentication on
(their own HOME, so their own token). Which node a Ray Train worker runs on is read from the
process tree: Ray Train logs each worker's pid ("(ip=..., pid=...) world_rank=..."), and that pid
descends from the raylet of its node (node_rank cannot tell: both nodes have the same IP here).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

from ckpt import CheckpointStore
from tests.conftest import BIN, ROOT, _stop_group, _wait_http, free_port

from .support import kill_group, start_baton, warm_groups_alive
from .test_deployments import flow_run, retry_like_the_ui, run_deployment, serving, wait_final

pytestmark = pytest.mark.integration

RAY = str(BIN / "ray")
POSTGRES_SCRIPT = ROOT / "scripts" / "postgres.sh"
# 4 epochs in 2 blocks on 2 workers, a checkpoint every 3 steps; slow steps (0.3 s), so that a node
# can be killed in the middle of a block.
TRAIN = ["--recipe", "tests.integration.recipes:slow_drill", "--epochs", "4", "--epochs-per-block", "2",
         "--workers", "2", "--checkpoint-every-steps", "3"]
BATCHES_PER_EPOCH = 8  # 128 samples, 2 ranks, batch size 8
WORKER_LINE = re.compile(r"\(ip=[^,]+, pid=(\d+)\) world_rank=(\d+)")


# ---- processes and the nodes they belong to ------------------------------------------------------

def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces
    return out


def _descendants(root: int) -> set[int]:
    children = defaultdict(list)
    for pid, parent in _parents().items():
        children[parent].append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children[todo.pop()]:
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class Cluster:
    """A Ray cluster of `ray start` processes on this machine: a head and worker nodes."""

    def __init__(self, env: dict[str, str], folder: Path):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's own processes (train workers included) resolve "auto" to this cluster, not to another
        # cluster on this machine; and they import the recipes of the checkout.
        self.env = dict(env, RAY_ADDRESS=self.address)
        self.folder = folder
        self.temp_dir = tempfile.mkdtemp(prefix="rtso", dir="/tmp")  # unix socket paths < 108 bytes
        self.nodes: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()

    def _start(self, name: str, args: list[str]) -> None:
        # Every port a second node on the same machine (or another cluster) would also take by default.
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                 "--metrics-export-port"]
        cmd = [RAY, "start", *args, "--block", "--disable-usage-stats", *(f"{p}={free_port()}" for p in ports)]
        log = self.folder / f"ray-{name}.log"
        self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start_head(self, cpus: int) -> None:
        self._start("head", ["--head", f"--port={self.port}", f"--num-cpus={cpus}", "--include-dashboard=false",
                             f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
                             f"--temp-dir={self.temp_dir}"])
        self.wait_nodes(1)

    def add_worker(self, name: str, cpus: int) -> None:
        self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}"])
        self.wait_nodes(len(self.alive()))

    def alive(self) -> list[str]:
        return [name for name, proc in self.nodes.items() if proc.poll() is None]

    def wait_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.nodes.items():
                if proc.poll() is not None and name not in self.killed:
                    raise RuntimeError(f"ray start ({name}) exited: {(self.folder / f'ray-{name}.log').read_text()[-3000:]}")
            out = subprocess.run([RAY, "status", f"--address={self.address}"], env=self.env, capture_output=True,
                                 text=True, timeout=60)
            active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
            if out.returncode == 0 and active.count("node_") == count:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {count} nodes in {timeout} s")

    def node_of(self, pid: int) -> str | None:
        """The node whose `ray start` process `pid` descends from (None: the process is gone)."""
        parents = _parents()
        roots = {proc.pid: name for name, proc in self.nodes.items()}
        while pid in parents:
            if pid in roots:
                return roots[pid]
            pid = parents[pid]
        return None

    def kill_node(self, name: str) -> int:
        """The node's machine vanishes: SIGKILL its process group and every process under it (Ray
        workers run in process groups of their own). Returns how many processes were killed."""
        proc = self.nodes[name]
        self.killed.add(name)
        doomed = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
        return len(doomed) + 1

    def stop(self) -> None:
        # Worker nodes first (SIGTERM makes `ray start` drain its node through the head), then the head.
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            proc = self.nodes[name]
            doomed = _descendants(proc.pid)
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    pass
                except ProcessLookupError:
                    pass
            for pid in doomed | {proc.pid}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(30)


@pytest.fixture(scope="module")
def two_nodes(base_env, prefect_server, session_dir):
    """A head with 2 CPUs and a worker node with 1 CPU: two workers that must be on different
    nodes fill both, and the head alone can still take both."""
    folder = session_dir / "scale-out"
    home = folder / "home"
    home.mkdir(parents=True, exist_ok=True)
    # The nodes get no S3 credentials: the driver's travel with each job (flows.train.FORWARDED_ENV).
    env = {k: v for k, v in base_env.items() if not k.startswith("AWS_")}
    env.update(HOME=str(home), PREFECT_API_URL=prefect_server)
    # Token authentication (Ray 2.60's default): every node and driver reads $HOME/.ray/auth_token.
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)
    cluster = Cluster(env, folder)
    started = time.monotonic()
    try:
        cluster.start_head(cpus=2)
        cluster.add_worker("worker", cpus=1)
        print(f"\ntwo-node Ray cluster at {cluster.address} up in {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


class Placements:
    """Follows a `baton train` log and records, for each Ray Train worker, its rank and node, while
    the worker still runs."""

    def __init__(self, log: Path, cluster: Cluster):
        self.log, self.cluster = log, cluster
        self.workers: dict[int, tuple[int, str | None, int]] = {}  # pid -> (rank, node, log offset)

    def poll(self) -> None:
        text = self.log.read_text(errors="replace")
        for match in WORKER_LINE.finditer(text):
            pid = int(match.group(1))
            if pid not in self.workers:
                self.workers[pid] = (int(match.group(2)), self.cluster.node_of(pid), match.start())

    def groups(self) -> list[dict[int, str | None]]:
        """Worker groups in order of start: {rank: node}."""
        out: list[dict[int, str | None]] = []
        for rank, node, _ in sorted(self.workers.values(), key=lambda w: w[2]):
            if not out or rank in out[-1]:
                out.append({})
            out[-1][rank] = node
        return out


def _train(cluster: Cluster, s3_env: dict[str, str], store: str, lineage: str, log: Path, *extra: str,
           on_poll=None, timeout: float = 420):
    env = dict(cluster.env, **s3_env)
    # --verbose: the placements are read from Ray's own worker lines, which a quiet terminal leaves out.
    args = ["train", "--verbose", "--ray-address", cluster.address, "--store", store, "--lineage", lineage, *TRAIN,
            *extra]
    placements = Placements(log, cluster)
    started = time.monotonic()
    proc = start_baton(args, env, Path(cluster.folder), log)
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"baton train did not finish in {timeout} s:\n{log.read_text()[-4000:]}"
            placements.poll()
            if on_poll is not None:
                on_poll(placements)
            time.sleep(0.2)
        placements.poll()
    finally:
        if proc.poll() is None:
            kill_group(proc)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    return placements, text, time.monotonic() - started


@pytest.fixture(scope="module")
def spread_run(two_nodes, s3_env, tmp_path_factory):
    """An uninterrupted run, each of the 2 workers on its own node (STRICT_SPREAD), on S3."""
    from tests.s3server import new_bucket

    store = new_bucket(s3_env, f"t-scale-out-{os.urandom(3).hex()}") + "/runs"
    log = tmp_path_factory.mktemp("spread") / "train.log"
    placements, text, seconds = _train(two_nodes, s3_env, store, "spread", log, "--placement-strategy", "STRICT_SPREAD",
                                       "--max-failures", "0", "--block-retries", "0")
    print(f"\nuninterrupted two-node run: {seconds:.1f} s; worker groups {placements.groups()}")
    return store, placements, text


def test_two_workers_on_two_nodes_of_an_existing_cluster_train_to_completion_on_s3(spread_run):
    store, placements, text = spread_run
    latest = CheckpointStore(store).latest("spread")
    assert latest.epochs_done == 4 and latest.step == 4 * BATCHES_PER_EPOCH
    assert CheckpointStore(store).verify_lineage("spread") == []
    groups = placements.groups()
    assert len(groups) == 1, groups  # one warm worker group for both blocks
    for group in groups:
        assert sorted(group) == [0, 1] and set(group.values()) == {"head", "worker"}, groups
    assert "Connecting to existing Ray cluster" in text or "Connected to Ray cluster" in text


def _ray_train_leftovers(env: dict) -> list[str]:
    """Ray Train actors (and Baton's warm groups) still alive on the test cluster, and placement
    groups still holding resources. GCS tables only: the cluster runs without a dashboard."""
    code = ("import ray, json\n"
            f"ray.init(address={env['RAY_ADDRESS']!r}, log_to_driver=False)\n"
            "from ray.core.generated import gcs_pb2\n"
            "acc = ray._private.state.state._connect_and_get_accessor()\n"
            "kinds = {'WarmGroup', 'TrainController', 'RayTrainWorker', 'PlacementGroupCleaner', 'SynchronizationActor'}\n"
            "rows = [gcs_pb2.ActorTableData.FromString(b) for b in acc.get_actor_table(None, None)]\n"
            "out = [a.class_name for a in rows if a.class_name in kinds and a.state != gcs_pb2.ActorTableData.DEAD]\n"
            "out += ['placement group ' + g['placement_group_id'] for g in ray.util.placement_group_table().values()\n"
            "        if g['state'] != 'REMOVED']\n"
            "print(json.dumps(out))")
    out = subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_worker_node_killed_mid_block_recovers_on_the_head_from_its_latest_checkpoint_exactly(
        two_nodes, spread_run, s3_env, s3_store, tmp_path):
    """SPREAD (best effort) puts the workers on both nodes while there are two, and both on the head
    once the worker node is gone: the world size stays 2, so the resume is exact. The blocks run on
    the warm worker group (the default): the block sees the node die under its group, tears the group
    down (actor, Ray Train run, placement group) and trains on a fresh fit from the store."""
    store, lineage, log = f"{s3_store}/runs", "nodekill", tmp_path / "train.log"
    kill: dict = {}

    def kill_mid_block(placements: Placements) -> None:
        if kill:
            return
        latest = CheckpointStore(store).latest(lineage)
        # Block 1 (epochs 2-3) has committed a checkpoint in the middle of epoch 2.
        if latest is None or latest.epoch != 2 or latest.position.epoch_complete:
            return
        placements.poll()
        kill.update(groups=placements.groups(), latest=latest.id, offset=len(log.read_text(errors="replace")),
                    at=time.monotonic())
        kill["processes"] = two_nodes.kill_node("worker")

    placements, text, seconds = _train(two_nodes, s3_env, store, lineage, log, "--placement-strategy", "SPREAD",
                                       "--max-failures", "1", "--block-retries", "1",
                                       on_poll=kill_mid_block)
    assert kill, f"training finished before a mid-block checkpoint of block 1 was seen:\n{text[-3000:]}"
    recovered = time.monotonic() - kill["at"]
    before, after = kill["groups"], placements.groups()[len(kill["groups"]):]
    # Before the kill, block 1's workers really were on two nodes.
    assert set(before[-1].values()) == {"head", "worker"}, before
    # After it, a new worker group of the same size ran on the head alone ...
    assert after and after[-1] == {0: "head", 1: "head"}, (before, after)
    # ... resumed from a checkpoint at or after the one committed before the kill, inside block 1 ...
    resumed = re.findall(r"resuming nodekill from (\d{6}-\d{10})", text[kill["offset"]:])
    assert resumed and resumed[0] >= kill["latest"] and resumed[0].startswith("000002-"), resumed
    # ... and ended bit-identical to the uninterrupted run.
    final = CheckpointStore(store).latest(lineage)
    spread = CheckpointStore(spread_run[0]).latest("spread")
    assert final.epochs_done == 4 and final.digest == spread.digest
    assert CheckpointStore(store).verify_lineage(lineage) == []
    # Block 1 gave up its warm group and trained on a fresh fit ...
    lost = re.search(r"the warm worker group of nodekill is gone \((.*?)\): block 1 starts a fresh one from the store",
                     text[kill["offset"]:])
    assert lost, text[kill["offset"]:][-6000:]
    # ... and nothing of the group, or of any Ray Train run, is left on the cluster.
    deadline, left = time.monotonic() + 60, None
    while left != [] and time.monotonic() < deadline:
        left = _ray_train_leftovers(two_nodes.env)
        time.sleep(0 if left == [] else 2)
    assert left == [] and warm_groups_alive(two_nodes.env, lineage) == (0, 0), left
    how = "Prefect retried the block task" if re.search(r"Retry 1/1|AwaitingRetry", text) else \
        f"the block fell back to a fresh fit ({lost.group(1)})"
    print(f"\nworker node killed ({kill['processes']} processes) after checkpoint {kill['latest']}; "
          f"{how}; resumed from {resumed[0]}; done {recovered:.1f} s after the kill, run {seconds:.1f} s; "
          f"groups before {before}, after {after}")


# ---- Prefect server on PostgreSQL ------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL from Debian's packages (scripts/postgres.sh), on 127.0.0.1 and a free port."""
    folder = tempfile.mkdtemp(prefix="baton-pg-", dir="/tmp")  # the postgres user must reach it
    port = free_port()
    started = time.monotonic()
    out = subprocess.run(["bash", str(POSTGRES_SCRIPT), "start", "--dir", folder, "--port", str(port)],
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        exports = dict(shlex.split(line[len("export "):])[0].split("=", 1)
                       for line in out.stdout.splitlines() if line.startswith("export "))
        print(f"\nPostgreSQL up in {time.monotonic() - started:.1f} s: {out.stderr.strip().splitlines()[-1]}")
        yield {"url": exports["PREFECT_API_DATABASE_CONNECTION_URL"], "port": port, "dir": folder}
    finally:
        subprocess.run(["bash", str(POSTGRES_SCRIPT), "stop", "--dir", folder], capture_output=True, timeout=120)


def _psql(postgres: dict, sql: str) -> str:
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(postgres["port"]), "-U", "prefect", "-d", "prefect",
                          "-At", "-c", sql], env=dict(os.environ, PGPASSWORD="prefect"), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def pg_prefect_server(base_env, postgres, session_dir):
    """`prefect server start` with its database on PostgreSQL (PREFECT_API_DATABASE_CONNECTION_URL)."""
    env = dict(base_env, PREFECT_HOME=str(session_dir / "prefect-pg"),
               PREFECT_API_DATABASE_CONNECTION_URL=postgres["url"])
    port = free_port()
    log = session_dir / "prefect-server-pg.log"
    started = time.monotonic()
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(f"{url}/health", 180, proc, log)
        print(f"\nPrefect server on PostgreSQL answering in {time.monotonic() - started:.1f} s")
        yield url
    finally:
        _stop_group(proc)


def test_a_prefect_server_on_postgresql_runs_a_deployment_and_retries_it_like_the_ui(
        pg_prefect_server, postgres, cluster_env, workdir):
    store = str(workdir / "ckpts")
    # Fails once in the middle of its only epoch, after a mid-epoch checkpoint; the retry resumes there.
    config = {"store": store, "lineage": "on-postgres", "epochs": 1, "epochs_per_block": 1, "workers": 2,
              "checkpoint_every_steps": 2, "max_failures": 0, "block_retries": 0,
              "fail": {"action": "raise", "epoch": 0, "batch": 3}}  # 4 batches an epoch
    env = dict(cluster_env, PREFECT_API_URL=pg_prefect_server)
    with serving(env, workdir, "--store", store) as (proc, log):
        run_id = run_deployment("train/on-demand", {"config": config}, env, workdir)
        failed = wait_final(pg_prefect_server, run_id, 300, proc, log)
        assert failed["state"]["type"] == "FAILED", failed["state"]
        latest = CheckpointStore(store).latest("on-postgres")
        assert latest.epoch == 0 and not latest.position.epoch_complete, latest.id
        assert retry_like_the_ui(pg_prefect_server, run_id)["status"] == "ACCEPT"
        done = wait_final(pg_prefect_server, run_id, 300, proc, log)
        assert done["state"]["type"] == "COMPLETED", f"{done['state']}\n{log.read_text()[-4000:]}"
    assert done["id"] == run_id and flow_run(pg_prefect_server, run_id)["run_count"] == 2
    final = CheckpointStore(store).latest("on-postgres")
    assert final.position.epoch_complete and final.step == 4 and final.parent == latest.id
    # The run and its deployment live in PostgreSQL.
    assert _psql(postgres, f"SELECT state_type, run_count FROM flow_run WHERE id = '{run_id}'") == "COMPLETED|2"
    assert "on-demand" in _psql(postgres, "SELECT name FROM deployment").split()
