"""A checkpoint writer for the crash-safety tests, run as its own process.

    python tests/ckpt/_writer.py STORE_URL

It encodes one training state of a few MB, prints ``ready``, then for each lineage name read from
stdin forks a child that commits checkpoints of that lineage in a loop (epoch 1, 2, ...) until it
is killed; it prints ``started PID`` at once, the child ``writing PID`` when it has committed once (to a scratch
lineage it then deletes) and is about to write, and the parent ``killed PID SIGNAL`` when the child is gone. The
fork keeps each trial cheap: the interpreter, torch and the encoded files are ready in the child.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time

import torch

from ckpt import CheckpointStore, Position, TrainingState, encode
from ckpt.state import META_FILE


def say(line: str) -> None:
    """One line in one write: parent and child share the pipe, and print() may split a line."""
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


def encoded_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 512)  # 2 MiB of weights, 2 MiB of momentum
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1024)).sum().backward()
    optimizer.step()
    position = Position(epoch=0, batch_in_epoch=0, epoch_complete=True, step=0)
    return encode(TrainingState(model=model.state_dict(), position=position, optimizer=optimizer.state_dict()))


def commit_forever(url: str, lineage: str, files: dict[str, bytes], digest: str) -> None:
    """Commit until killed (or, should nobody kill it, for at most a minute)."""
    try:  # die with the parent, whatever kills it
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass
    deadline = time.monotonic() + 60
    store = CheckpointStore(url)
    meta = json.loads(bytes(files[META_FILE]))
    # Warmed up: a forked child's first commit also opens its connections (150 ms against 20 ms on
    # fake-gcs-server), and a kill window calibrated on steady commits would always fall before it.
    warm = f"{lineage}.warm"
    store.commit(warm, Position(epoch=0, batch_in_epoch=0, epoch_complete=True, step=0), files, digest=digest)
    store.fs.rm(store.path(warm), recursive=True)
    say(f"writing {os.getpid()}")  # the kill window starts with the first write
    for epoch in range(1, 100_000):
        if time.monotonic() > deadline:
            return
        position = Position(epoch=epoch, batch_in_epoch=0, epoch_complete=True, step=epoch * 10)
        meta["position"] = position.model_dump()
        store.commit(lineage, position, dict(files, **{META_FILE: json.dumps(meta, sort_keys=True).encode()}),
                     digest=digest)


def main() -> None:
    url = sys.argv[1]
    files = encoded_state()
    digest = files.digest
    say("ready")
    for line in sys.stdin:
        lineage = line.strip()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                commit_forever(url, lineage, files, digest)
            except BaseException as err:  # noqa: BLE001 - reported, and the exit code says so
                print(f"writer child failed: {err!r}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        say(f"started {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"killed {pid} {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)}")


if __name__ == "__main__":
    main()
