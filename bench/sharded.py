"""sharded_save_vs_dcp and sharded_load_vs_dcp: Baton's sharded checkpoint (ckpt.dcp, commit and
hashes included) against torch.distributed.checkpoint with its FileSystemWriter/Reader, of the same
FSDP2 model + Adam state on the same 2 gloo ranks, alternating (ABBA) in one run.

A ratio is DCP's seconds over Baton's: >= 1.0 means Baton is as fast while adding BLAKE3 hashes,
the atomic commit and fencing (and, on load, verification of every byte read)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time

import torch

from ._common import MiB, Result, drop_caches, gb_s, median

WORLD = 2
WIDTH = 1024  # one Linear(1024, 1024): 4 MiB of weights, 12 MiB with Adam's two moments


def sharded_vs_dcp(nbytes: int, reps: int, where: str | None = None) -> list[Result]:
    import torch.multiprocessing as mp

    root = tempfile.mkdtemp(prefix="baton-bench-sharded-", dir=where)
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_rank, args=(port, root, nbytes, reps), nprocs=WORLD, join=True)
        with open(os.path.join(root, "times.json")) as handle:
            times = json.load(handle)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return [_result("sharded_save_vs_dcp", times["dcp_save"], times["baton_save"], times, "save"),
            _result("sharded_load_vs_dcp", times["dcp_load"], times["baton_load"], times, "load")]


def _result(name: str, dcp_s: list[float], baton_s: list[float], times: dict, kind: str) -> Result:
    ratio = median(dcp_s) / median(baton_s)
    nbytes = times["state_bytes"]
    return Result(name, ratio, ">= 1.0", ratio >= 1.0,
                  detail={"state_MiB": nbytes // MiB, "ranks": WORLD, "reps": len(baton_s),
                          f"baton_{kind}_GBps": round(gb_s(nbytes, median(baton_s)), 2),
                          f"dcp_{kind}_GBps": round(gb_s(nbytes, median(dcp_s)), 2),
                          "each_rep": [round(d / b, 2) for d, b in zip(dcp_s, baton_s)],
                          **({"cache": times["cache"]} if kind == "load" else {})},
                  note=f"FSDP2 model+Adam on {WORLD} gloo ranks; ckpt.dcp.{kind} vs dcp.{kind} with FileSystem"
                       f"{'Writer' if kind == 'save' else 'Reader'}, from barrier to barrier")


def _rank(rank: int, port: int, root: str, nbytes: int, reps: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        times = _measure(rank, root, nbytes, reps)
        if rank == 0:
            with open(os.path.join(root, "times.json"), "w") as handle:
                json.dump(times, handle)
    finally:
        dist.destroy_process_group()


def _sharded_state(nbytes: int):
    """An FSDP2 model of Linear layers with Adam state, `nbytes` in all (weights + 2 moments)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = max(1, round(nbytes / (3 * 4 * WIDTH * WIDTH)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.01)
    optimizer.step()
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}, 3 * 4 * WIDTH * WIDTH * layers


def _measure(rank: int, root: str, nbytes: int, reps: int) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import ckpt.dcp
    from ckpt import CheckpointStore, Position

    state, total = _sharded_state(nbytes)
    store = CheckpointStore(os.path.join(root, "store"))
    out: dict = {"baton_save": [], "dcp_save": [], "baton_load": [], "dcp_load": [], "state_bytes": total}
    cold = True

    def timed(fn) -> float:
        dist.barrier()
        started = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - started

    for rep in range(reps):
        position = Position(epoch=rep, batch_in_epoch=1, epoch_complete=False, step=rep + 1)
        folder = os.path.join(root, f"dcp-{rep}")
        manifest: list = []
        sides = ("baton", "dcp") if rep % 2 == 0 else ("dcp", "baton")
        for side in sides:
            if side == "baton":
                out["baton_save"].append(timed(lambda: manifest.append(ckpt.dcp.save(store, "bench", position, state))))
            else:
                out["dcp_save"].append(timed(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(folder))))
        committed = store.manifest("bench", ckpt.checkpoint_id(position.epoch, position.step))
        for side in sides:
            if rank == 0:
                cold &= drop_caches()
            if side == "baton":
                out["baton_load"].append(timed(lambda: ckpt.dcp.load(store, committed, state)))
            else:
                out["dcp_load"].append(timed(lambda: dcp.load(state, storage_reader=dcp.FileSystemReader(folder))))
        dist.barrier()
        if rank == 0:
            store.delete("bench", committed.id)
            shutil.rmtree(folder, ignore_errors=True)
    out["cache"] = "cold cache" if cold else "warm cache (could not drop caches)"
    return out
