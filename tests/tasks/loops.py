"""User training loops written the way a Baton user writes them (not Baton's built-in loop): used
by the in-process tests here and, by import path, by the Ray integration tests."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset


class Noisy(Dataset):
    """256 samples whose features depend only on the index (safe in loader worker processes)."""

    def __len__(self) -> int:
        return 256

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(12, generator=generator)
        return x, int(x.sum() > 0)


def two_optimizers(ctx) -> None:
    """DataLoader with 2 worker processes, two optimizers, a GradScaler, dropout, a scheduler,
    extra JSON state; `step_seconds` in ctx.options slows steps down for kill tests."""
    encoder = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.2))
    head = nn.Linear(32, 2)
    model = nn.Sequential(encoder, head)
    opt_encoder = torch.optim.SGD(encoder.parameters(), lr=0.05, momentum=0.9)
    opt_head = torch.optim.Adam(head.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(opt_encoder, step_size=1, gamma=0.7)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    state = ctx.restore(model=model, optimizer=opt_encoder, scheduler=scheduler, scaler=scaler,
                        head_optimizer=opt_head, state={"seen": 0})
    net = ctx.prepare_model(model) if ctx.world_size > 1 else model
    loader = ctx.loader(Noisy(), batch_size=8, num_workers=int(ctx.options.get("num_workers", 2)))
    pause = float(ctx.options.get("step_seconds", 0))
    for _ in ctx.epochs():
        for x, y in loader:
            opt_encoder.zero_grad()
            opt_head.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt_encoder)
            scaler.step(opt_head)
            scaler.update()
            state["seen"] += len(y)
            if pause:
                time.sleep(pause)
            ctx.step(loss=loss.item())
        scheduler.step()
        ctx.end_epoch()


def plain_loader(ctx) -> None:
    """Negative control: the same model fed by a plain DataLoader, whose position Baton cannot save."""
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctx.restore(model=model, optimizer=optimizer)
    loader = torch.utils.data.DataLoader(Noisy(), batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for _ in ctx.epochs():
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            ctx.step(loss=loss.item())
        ctx.end_epoch()


def returns_early(ctx) -> None:
    model = nn.Linear(2, 2)
    ctx.restore(model=model)
    for _ in ctx.epochs():
        return


def numbers(params):
    """A Ray Data set for `datasets: {"train": "tests.tasks.loops:numbers"}`, in a fixed order."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    rows = []
    for index in range(128):
        x = torch.randn(12, generator=torch.Generator().manual_seed(index))
        rows.append({"x": x.numpy(), "y": int(x.sum() > 0)})
    return ray.data.from_items(rows)


def ray_data(ctx) -> None:
    """A loop fed by Ray Data (`ctx.dataset_shard`): checkpoints at epoch ends only."""
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctx.restore(model=model, optimizer=optimizer)
    net = ctx.prepare_model(model) if ctx.world_size > 1 else model
    shard = ctx.dataset_shard("train")
    for _ in ctx.epochs():
        for batch in shard.iter_torch_batches(batch_size=8):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(batch["x"]), batch["y"])
            loss.backward()
            optimizer.step()
            ctx.step(loss=loss.item())
        ctx.end_epoch()


def notice_on_last_batch(ctx) -> None:
    """Gives itself a preemption notice on the last batch of epoch 0 (and waits for the watcher)."""
    from tasks.runtime.stop import give_notice

    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx.restore(model=model, optimizer=optimizer)
    loader = ctx.loader(Noisy(), batch_size=32)
    for epoch in ctx.epochs():
        for batch, (x, y) in enumerate(loader):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            if epoch == 0 and batch == len(loader) - 1:
                give_notice(ctx.store, ctx.spec.lineage, ctx.spec.fence, "test")
                time.sleep(0.8)
            ctx.step(loss=loss.item())
        ctx.end_epoch()


def steps_mid_window(ctx) -> None:
    """Wrong on purpose: accumulates over 4 micro-batches but calls ctx.step on every one."""
    model = nn.Linear(12, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx.restore(model=model, optimizer=optimizer)
    loader = ctx.loader(Noisy(), batch_size=8)
    for _ in ctx.epochs():
        for (x, y), _step in ctx.accumulate(loader, every=4):
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            ctx.step()
        ctx.end_epoch()


def counts_batches(ctx) -> None:
    """Records (epoch, ctx.batch_in_epoch, ctx.batches_in_epoch) at every batch, in its saved state."""
    model = nn.Linear(12, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    state = ctx.restore(model=model, optimizer=optimizer, state={"seen": []})
    loader = ctx.loader(Noisy(), batch_size=8)
    for epoch in ctx.epochs():
        for x, y in loader:
            state["seen"].append([epoch, ctx.batch_in_epoch, ctx.batches_in_epoch])
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            ctx.step()
        ctx.end_epoch()


def hangs_on_rank_1(ctx) -> None:
    """A plain loop on ctx.loader; with `hang_at` in ctx.options, rank 1 sleeps forever before that
    step (after writing `hang_file`): the step watchdog's case."""
    model = nn.Linear(12, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx.restore(model=model, optimizer=optimizer)
    net = ctx.prepare_model(model) if ctx.world_size > 1 else model
    loader = ctx.loader(Noisy(), batch_size=8, num_workers=0)
    hang_at = ctx.options.get("hang_at")
    for _ in ctx.epochs():
        for x, y in loader:
            if hang_at is not None and ctx.rank == 1 and ctx.global_step + 1 == hang_at:
                with open(ctx.options["hang_file"], "w") as marker:
                    marker.write(str(time.time()))
                time.sleep(3600)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            ctx.step(loss=loss.item())
