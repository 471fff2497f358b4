"""Real ranks for the sharded-checkpoint tests: processes in a gloo group (torch.multiprocessing),
each training, saving or loading a tiny FSDP2 or DDP model. Checks run inside the ranks; a failed
one fails `run_ranks` with the rank's traceback."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

WIDTH = 6


def run_ranks(world: int, fn, *args) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_entry, args=(world, port, fn, args), nprocs=world, join=True)


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def make_model(seed: int) -> torch.nn.Module:
    # Odd sizes: FSDP2 shards unevenly (7 rows over 2 or 3 ranks), which resharding must handle.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def fsdp(model: torch.nn.Module, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train(model, optimizer, steps: int = 2) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, WIDTH, generator=generator)).pow(2).mean().backward()
        optimizer.step()


def full(tensors: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a state dict, whole (DTensors gathered), by flat name."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in tensors.items():
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in full(value).items()})
        elif isinstance(value, torch.Tensor):
            out[name] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone().contiguous()
    return out


def flat_optim(osd: dict) -> dict:
    return {"state": osd["state"]}


def local(tensors: dict) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in tensors.items():
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in local(value).items()})
        elif isinstance(value, torch.Tensor):
            out[name] = (value.to_local() if isinstance(value, DTensor) else value).detach().clone().contiguous()
    return out


def fsdp_save_then_load(rank: int, world: int, store_url: str, out: str) -> None:
    """Train an FSDP2 model 2 steps, save model+Adam into a Baton checkpoint, then load it into a
    fresh FSDP2 model on the same ranks: each rank's shards are bit-identical."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import ckpt.dcp
    from ckpt import CheckpointStore, Position

    store = CheckpointStore(store_url)
    model = fsdp(make_model(0), world)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, optimizer)
    msd, osd = get_state_dict(model, optimizer)
    position = Position(epoch=0, batch_in_epoch=2, epoch_complete=False, step=2)
    manifest = ckpt.dcp.save(store, "run", position, {"model": msd, "optim": osd},
                             files={"rng.json": json.dumps({"rank": rank}).encode()}, metrics={"loss": 1.0})
    expected = full({"model": msd, "optim": flat_optim(osd)})
    if rank == 0:
        save_file(expected, str(Path(out) / "full.safetensors"))
        Path(out, "manifest_id").write_text(manifest.id)
    dist.barrier()
    manifest = store.manifest("run", Path(out, "manifest_id").read_text())

    fresh = fsdp(make_model(5), world)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    state = dict(zip(("model", "optim"), get_state_dict(fresh, fresh_opt)))
    ckpt.dcp.load(store, manifest, state)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    got_msd, got_osd = get_state_dict(fresh, fresh_opt)
    mine = local({"model": msd, "optim": flat_optim(osd)})
    again = local({"model": got_msd, "optim": flat_optim(got_osd)})
    assert mine.keys() == again.keys()
    for name in mine:
        assert torch.equal(mine[name], again[name]), f"rank {rank}: {name} differs after the load"
    assert got_osd["param_groups"][0]["lr"] == 0.01 and got_osd["param_groups"][0]["betas"] == (0.9, 0.999)


def fsdp_load_resharded(rank: int, world: int, store_url: str, out: str) -> None:
    """Load the 2-rank checkpoint on `world` ranks: the full tensors equal the saved ones."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import ckpt.dcp
    from ckpt import CheckpointStore

    store = CheckpointStore(store_url)
    manifest = store.manifest("run", Path(out, "manifest_id").read_text())
    model = fsdp(make_model(7), world)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.3)
    state = dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
    ckpt.dcp.load(store, manifest, state, verify=rank % 2 == 0)  # both ways of reading
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    msd, osd = get_state_dict(model, optimizer)
    got = full({"model": msd, "optim": flat_optim(osd)})
    expected = load_file(str(Path(out) / "full.safetensors"))
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), f"{world} ranks: {name} differs"


def ddp_save_then_load(rank: int, world: int, store_url: str, out: str) -> None:
    """A DDP model's replicated state is written once, spread over the ranks; it loads back whole."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel

    import ckpt.dcp
    from ckpt import CheckpointStore, Position

    store = CheckpointStore(store_url)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(8)]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    msd, osd = get_state_dict(model, optimizer)
    assert not any(name.startswith("module.") for name in msd)  # torch's names are the unwrapped module's
    position = Position(epoch=1, batch_in_epoch=0, epoch_complete=True, step=4)
    manifest = ckpt.dcp.save(store, "ddp", position, {"model": msd, "optim": osd})
    if rank == 0:
        Path(out, "manifest_id").write_text(manifest.id)
    dist.barrier()
    manifest = store.manifest("ddp", Path(out, "manifest_id").read_text())
    torch.manual_seed(9)
    fresh = DistributedDataParallel(torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(8)]))
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
    state = dict(zip(("model", "optim"), get_state_dict(fresh, fresh_opt)))
    ckpt.dcp.load(store, manifest, state)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
