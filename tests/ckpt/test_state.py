"""The training state format (DESIGN invariants 6 and 7): everything needed to resume exactly
round-trips through safetensors and JSON, and loading never unpickles."""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
from collections import OrderedDict

import numpy as np
import pytest
import torch

from ckpt import CheckpointUndecodable, Position, RankRNG, TrainingState, capture_rng, decode, encode, model_digest, restore_rng
from ckpt.state import META_FILE, MODEL_FILE, TENSORS_FILE

POS = Position(epoch=2, batch_in_epoch=7, epoch_complete=False, step=57)


def net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=generator), torch.randint(0, 2, (16,), generator=generator)


def train_step(model, optimizer, seed: int, scheduler=None) -> None:
    x, y = batch(seed)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def round_trip(state: TrainingState) -> TrainingState:
    files = encode(state)
    return decode(files)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)  # safetensors stores names sorted; load_state_dict does not care
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


# ---- model, optimizer, scheduler -------------------------------------------------------------
def test_the_model_round_trips_bit_for_bit_buffers_and_integer_tensors_included():
    model = net()
    model.train()
    model(torch.randn(4, 6))  # running stats and num_batches_tracked (int64) move
    restored = round_trip(TrainingState(model=model.state_dict(), position=POS))
    assert_same_tensors(model.state_dict(), restored.model)
    assert restored.model["1.num_batches_tracked"].dtype == torch.int64
    assert restored.position == POS


@pytest.mark.parametrize("make_optimizer", [
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), id="sgd-momentum"),
    pytest.param(lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), weight_decay=1e-3), id="adam"),
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True), id="adamw-amsgrad"),
])
def test_a_restored_optimizer_takes_the_same_next_step_as_the_original(make_optimizer):
    model = net()
    optimizer = make_optimizer(model.parameters())
    for seed in range(3):
        train_step(model, optimizer, seed)
    restored = round_trip(TrainingState(model=model.state_dict(), position=POS, optimizer=optimizer.state_dict()))

    twin = net(seed=99)  # other initial weights: everything must come from the checkpoint
    twin.load_state_dict(restored.model)
    twin_optimizer = make_optimizer(twin.parameters())
    twin_optimizer.load_state_dict(restored.optimizer)
    for seed in (3, 4):
        train_step(model, optimizer, seed)
        train_step(twin, twin_optimizer, seed)
    assert_same_tensors(model.state_dict(), twin.state_dict())


def test_an_optimizer_restored_without_its_state_would_diverge():
    # The negative control of the test above: momentum matters, so that test can fail.
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for seed in range(3):
        train_step(model, optimizer, seed)
    twin = net(seed=99)
    twin.load_state_dict(round_trip(TrainingState(model=model.state_dict(), position=POS)).model)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    train_step(model, optimizer, 3)
    train_step(twin, twin_optimizer, 3)
    assert model_digest(model.state_dict()) != model_digest(twin.state_dict())


def test_a_restored_step_lr_scheduler_continues_the_same_learning_rate_schedule():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for seed in range(3):
        train_step(model, optimizer, seed, scheduler)
    restored = round_trip(TrainingState(model=model.state_dict(), position=POS, optimizer=optimizer.state_dict(),
                                        scheduler=scheduler.state_dict()))

    twin = net()
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=1.0)
    twin_scheduler = torch.optim.lr_scheduler.StepLR(twin_optimizer, step_size=7, gamma=0.9)
    twin.load_state_dict(restored.model)
    twin_optimizer.load_state_dict(restored.optimizer)
    twin_scheduler.load_state_dict(restored.scheduler)
    original, resumed = [], []
    for seed in range(3, 9):
        train_step(model, optimizer, seed, scheduler)
        train_step(twin, twin_optimizer, seed, twin_scheduler)
        original.append(scheduler.get_last_lr())
        resumed.append(twin_scheduler.get_last_lr())
    assert resumed == original and original[0] != original[-1]
    assert_same_tensors(model.state_dict(), twin.state_dict())


# ---- RNG -------------------------------------------------------------------------------------
def draws() -> tuple:
    return (random.random(), random.getrandbits(64), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.randint(0, 2**31, 3).tolist(), np.random.normal(), torch.rand(3).tolist(), torch.randn(2).tolist())


def test_captured_rng_states_restore_the_same_random_numbers():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()
    state = capture_rng()
    first = draws()
    restore_rng(state)
    assert draws() == first


def test_rng_states_survive_the_checkpoint_format_for_every_rank():
    random.seed(4), np.random.seed(5), torch.manual_seed(6)
    np.random.normal()  # leaves numpy holding a cached gaussian
    ranks = [capture_rng()]
    expected = [draws()]
    ranks.append(capture_rng())
    expected.append(draws())
    restored = round_trip(TrainingState(model={}, position=POS, rng=ranks))
    assert len(restored.rng) == 2 and all(isinstance(r, RankRNG) for r in restored.rng)
    for rank_state, rank_draws in zip(restored.rng, expected):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        restore_rng(rank_state)
        assert draws() == rank_draws
    files = encode(TrainingState(model={}, position=POS, rng=ranks))
    json.dumps(json.loads(bytes(files[META_FILE])))  # plain JSON, no Python objects


# ---- extra and progress ----------------------------------------------------------------------
def test_extra_state_with_nested_tensors_and_json_values_round_trips():
    extra = {
        "ema": {"weight": torch.arange(6, dtype=torch.float64).reshape(2, 3), "decay": 0.999},
        "history": [1, 2.5, None, True, "text", {"nested": torch.tensor([7], dtype=torch.int16)}],
        "counts": np.int64(3),
        "tuple": (1, 2),
    }
    restored = round_trip(TrainingState(model={}, position=POS, extra=extra, progress={"loss_sum": 1.5, "batches": 3.0}))
    assert torch.equal(restored.extra["ema"]["weight"], extra["ema"]["weight"])
    assert restored.extra["ema"]["weight"].dtype == torch.float64
    assert restored.extra["ema"]["decay"] == 0.999
    assert restored.extra["history"][:5] == [1, 2.5, None, True, "text"]
    assert torch.equal(restored.extra["history"][5]["nested"], torch.tensor([7], dtype=torch.int16))
    assert restored.extra["counts"] == 3 and restored.extra["tuple"] == [1, 2]
    assert restored.progress == {"loss_sum": 1.5, "batches": 3.0}


def test_tensors_that_share_storage_are_saved_as_separate_copies():
    weight = torch.randn(4, 4)
    model = {"encoder.weight": weight, "decoder.weight": weight, "view": weight[0]}  # tied weights
    restored = round_trip(TrainingState(model=model, position=POS))
    assert_same_tensors({k: v.contiguous() for k, v in model.items()}, restored.model)


@pytest.mark.parametrize("value, kind", [({1, 2}, "set"), (lambda: 1, "function"), (object(), "object"),
                                         (b"bytes", "bytes")])
def test_storing_a_value_that_is_not_json_or_a_tensor_is_refused_with_a_clear_message(value, kind):
    with pytest.raises(TypeError, match=f"cannot store a {kind} in a checkpoint: only tensors and JSON values"):
        encode(TrainingState(model={}, position=POS, extra={"deep": [{"x": value}]}))
    with pytest.raises(TypeError, match=f"cannot store a {kind}"):
        encode(TrainingState(model={}, position=POS, optimizer={"state": {}, "param_groups": [{"f": value}]}))


# ---- digest ----------------------------------------------------------------------------------
def test_the_model_digest_is_equal_exactly_when_the_weights_are():
    weights = net().state_dict()
    same = {k: v.clone() for k, v in weights.items()}
    assert model_digest(weights) == model_digest(same)
    assert model_digest(weights) == model_digest(OrderedDict(reversed(list(same.items()))))

    changed = {k: v.clone() for k, v in weights.items()}
    changed["0.weight"][3, 2] += 1e-6
    assert model_digest(changed) != model_digest(weights)
    renamed = dict(same)
    renamed["0.w"] = renamed.pop("0.weight")
    assert model_digest(renamed) != model_digest(weights)
    reshaped = dict(same, **{"0.weight": same["0.weight"].reshape(-1)})
    assert model_digest(reshaped) != model_digest(weights)
    retyped = dict(same, **{"0.bias": same["0.bias"].view(torch.int32)})  # same bytes, other dtype
    assert model_digest(retyped) != model_digest(weights)
    assert encode(TrainingState(model=weights, position=POS)).digest == model_digest(weights)


# ---- loading runs no code --------------------------------------------------------------------
def test_the_files_hold_no_pickle_only_safetensors_and_json():
    model = net()
    optimizer = torch.optim.Adam(model.parameters())
    train_step(model, optimizer, 0)
    files = encode(TrainingState(model=model.state_dict(), position=POS, optimizer=optimizer.state_dict(),
                                    rng=[capture_rng()], extra={"t": torch.ones(2)}))
    assert set(files) == {MODEL_FILE, TENSORS_FILE, META_FILE}
    meta = json.loads(bytes(files[META_FILE]))
    assert meta["position"] == POS.model_dump()
    for name in (MODEL_FILE, TENSORS_FILE):
        data = bytes(files[name])
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
        assert len(data) == 8 + header_len + end, name  # nothing but the header and the tensor bytes
    for data in map(bytes, files.values()):
        assert not data.startswith(b"\x80") and not data.startswith(b"PK"), "a pickle or torch.save zip"


class Payload:
    """Unpickling this calls open(path, 'w'): it creates a file, proving code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", [MODEL_FILE, TENSORS_FILE, META_FILE])
def test_a_pickle_disguised_as_a_checkpoint_file_fails_to_load_without_running(name, tmp_path):
    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(2), "payload": Payload(marker)}, buffer)
    files = encode(TrainingState(model=net().state_dict(), position=POS))
    files[name] = buffer.getvalue()

    with pytest.raises(CheckpointUndecodable):
        decode(files)
    assert not marker.exists()
    # The payload is live: a loader that unpickles would have run it.
    torch.load(io.BytesIO(files[name]), weights_only=False)
    assert marker.exists()


def test_a_plain_pickle_disguised_as_state_json_fails_to_load_without_running(tmp_path):
    marker = tmp_path / "code-ran"
    files = encode(TrainingState(model={}, position=POS))
    files[META_FILE] = pickle.dumps(Payload(marker))
    with pytest.raises(CheckpointUndecodable, match="not a training state"):
        decode(files)
    assert not marker.exists()


def test_a_state_of_an_unknown_format_version_is_refused():
    files = encode(TrainingState(model={}, position=POS))
    meta = json.loads(bytes(files[META_FILE]))
    meta["format"] = 99
    with pytest.raises(CheckpointUndecodable, match="unknown checkpoint state format 99"):
        decode(dict(files, **{META_FILE: json.dumps(meta).encode()}))


@pytest.mark.parametrize("name, content", [
    (META_FILE, b"[1, 2, 3]"),
    (META_FILE, b'{"format": 1}'),
    (META_FILE, b"\xff\xfe not even text"),
    (TENSORS_FILE, b"short"),
    (MODEL_FILE, struct.pack("<Q", 4) + b'"no"'),
    (MODEL_FILE, None),
])
def test_files_that_are_not_a_training_state_raise_checkpoint_undecodable_naming_the_remedy(name, content):
    files = dict(encode(TrainingState(model=net().state_dict(), position=POS, rng=[capture_rng()])))
    if content is None:
        del files[name]
    else:
        files[name] = content
    with pytest.raises(CheckpointUndecodable) as err:
        decode(files)
    assert isinstance(err.value, ValueError)
    assert pickle.loads(pickle.dumps(err.value)).args == err.value.args
