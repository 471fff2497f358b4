"""A small transformer language model trained on text that ships with Python, as a Baton loop.

The text is the standard library's `pydoc_data/topics.py` (the help topics, ~460 KB of English):
nothing is downloaded. Characters are the tokens (bytes, 256 of them). AMP: bf16 autocast on
CPU, fp16 with a GradScaler on GPU. Gradient accumulation: `accumulate` micro-batches per step,
through `ctx.accumulate`, whose windows survive a mid-epoch resume.

    baton train --loop examples.lm:train_loop --epochs 2 --epochs-per-block 1 --workers 2 \
        --checkpoint-every-steps 20
    baton train --loop examples.lm:train_loop --gpus-per-worker 1 --workers 1 \
        --options '{"width": 384, "layers": 6, "batch": 64}'

Options (`--options` JSON): width, layers, heads, context, batch, accumulate, lr, windows (cap on
training windows per epoch, 0 = all), num_workers (DataLoader processes).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

DEFAULTS = {"width": 128, "layers": 2, "heads": 4, "context": 64, "batch": 16, "accumulate": 2, "lr": 3e-3,
            "windows": 0, "num_workers": 0}


def corpus() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


class Windows(Dataset):
    """Non-overlapping windows of `context + 1` tokens: inputs and next-token targets."""

    def __init__(self, tokens: torch.Tensor, context: int, limit: int = 0):
        self.tokens, self.context = tokens, context
        count = (len(tokens) - 1) // context
        self.count = min(count, limit) if limit else count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        chunk = self.tokens[index * self.context:(index + 1) * self.context + 1]
        return chunk[:-1], chunk[1:]


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # Attention written out (not fused): the same arithmetic on every run, CPU or GPU.
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attn = self.drop(scores.masked_fill(mask, float("-inf")).softmax(dim=-1))
        x = x + self.drop(self.proj((attn @ v).transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TinyGPT(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, context: int):
        super().__init__()
        self.embed, self.position = nn.Embedding(256, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.norm(self.blocks(self.embed(tokens) + self.position(positions))))


def train_loop(ctx) -> None:
    o = {**DEFAULTS, **ctx.options}
    on_gpu = ctx.device.type == "cuda"
    if on_gpu:  # exact resume on a GPU needs deterministic kernels
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    tokens = corpus()
    held_out = len(tokens) // 20
    train_set = Windows(tokens[held_out:], o["context"], o["windows"])
    validation = Windows(tokens[:held_out], o["context"], 64)
    model = TinyGPT(o["width"], o["layers"], o["heads"], o["context"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=o["lr"], weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, ctx.params.epochs))
    scaler = torch.amp.GradScaler("cuda", enabled=on_gpu)  # fp16 needs loss scaling; bf16 does not
    ctx.restore(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    net = ctx.prepare_model(model)  # ray.train.torch.prepare_model under Ray: DDP, device placement
    loader = ctx.loader(train_set, batch_size=o["batch"], num_workers=o["num_workers"], pin_memory=on_gpu)
    amp = dict(device_type="cuda", dtype=torch.float16) if on_gpu else dict(device_type="cpu", dtype=torch.bfloat16)
    for _ in ctx.epochs():
        net.train()
        # Windows of `accumulate` micro-batches counted from the epoch's start, also after a mid-epoch
        # resume (a counter of our own would restart at the resume and lose the odd last window's step).
        for (x, y), step in ctx.accumulate(loader, every=o["accumulate"]):
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with torch.autocast(**amp):
                loss = F.cross_entropy(net(x).flatten(0, 1).float(), y.flatten()) / o["accumulate"]
            scaler.scale(loss).backward()
            if step:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                ctx.step(loss=loss.item() * o["accumulate"])
        scheduler.step()
        ctx.end_epoch(val_loss=evaluate(model, validation, ctx.device, amp))


@torch.no_grad()
def evaluate(model: nn.Module, data: Windows, device: torch.device, amp: dict) -> float:
    model.eval()
    x = torch.stack([data[i][0] for i in range(len(data))]).to(device)
    y = torch.stack([data[i][1] for i in range(len(data))]).to(device)
    with torch.autocast(**amp):
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item()
    model.train()
    return loss
