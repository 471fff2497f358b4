"""The digits MLP as your own loop, fed by a DataLoader with 2 worker processes.

    baton train --loop examples.digits:train_loop --epochs 4 --checkpoint-every-steps 10

A kill at any moment resumes at the next unseen batch: the loader's position (its worker
processes included) is part of every checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits  # ships inside scikit-learn: nothing is downloaded

    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    train, held_out = order[:1440], order[1440:]
    return TensorDataset(inputs[train], labels[train]), TensorDataset(inputs[held_out], labels[held_out])


def train_loop(ctx) -> None:
    train_set, validation = digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=ctx.options.get("lr", 0.05), momentum=0.9)
    ctx.restore(model=model, optimizer=optimizer)
    net = ctx.prepare_model(model)
    loader = ctx.loader(train_set, batch_size=32, num_workers=2, persistent_workers=True)
    for _ in ctx.epochs():
        net.train()
        for x, y in loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            ctx.step(loss=loss.item())
        model.eval()
        with torch.no_grad():
            x, y = (t.to(ctx.device) for t in validation.tensors)
            logits = model(x)
        ctx.end_epoch(val_loss=nn.functional.cross_entropy(logits, y).item(),
                      val_accuracy=(logits.argmax(1) == y).float().mean().item())
