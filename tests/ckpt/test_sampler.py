"""The resumable distributed sampler (DESIGN invariant 7): every sample at most once per epoch,
the same order after a restart, and a mid-epoch resume that yields exactly the rest of the epoch."""

from __future__ import annotations

import itertools

import pytest

from ckpt import ResumableSampler

SHAPES = [(10, 1, 3), (10, 3, 2), (100, 4, 7), (7, 7, 1), (33, 2, 32), (64, 8, 5), (5, 2, 100)]


def epoch_batches(length, batch_size, rank, world, epoch, seed=0, start_batch=0, shuffle=True) -> list[list[int]]:
    sampler = ResumableSampler(length, batch_size, rank=rank, world_size=world, seed=seed, shuffle=shuffle)
    sampler.set_position(epoch, start_batch)
    return list(sampler)


@pytest.mark.parametrize("length, world, batch_size", SHAPES)
def test_the_shards_of_all_ranks_are_disjoint_and_cover_all_but_the_remainder(length, world, batch_size):
    for epoch in range(3):
        seen = [list(itertools.chain.from_iterable(epoch_batches(length, batch_size, rank, world, epoch)))
                for rank in range(world)]
        every = list(itertools.chain.from_iterable(seen))
        assert len(every) == len(set(every)) == length - length % world
        assert set(every) <= set(range(length))
        assert len({len(shard) for shard in seen}) == 1  # every rank sees as many samples
        assert len({len(epoch_batches(length, batch_size, r, world, epoch)) for r in range(world)}) == 1


def test_a_data_set_that_is_a_multiple_of_the_world_is_seen_whole_every_epoch():
    for epoch in range(4):
        every = [i for rank in range(4) for b in epoch_batches(40, 3, rank, 4, epoch) for i in b]
        assert sorted(every) == list(range(40))


def test_the_samples_left_out_change_from_epoch_to_epoch():
    left_out = set()
    for epoch in range(20):
        seen = {i for rank in range(3) for b in epoch_batches(10, 2, rank, 3, epoch) for i in b}
        (missing,) = set(range(10)) - seen
        left_out.add(missing)
    assert len(left_out) > 1


def test_the_same_seed_and_epoch_give_the_same_order_in_a_new_sampler():
    for rank in range(3):
        assert epoch_batches(50, 4, rank, 3, epoch=5, seed=7) == epoch_batches(50, 4, rank, 3, epoch=5, seed=7)


def test_other_epochs_and_other_seeds_give_other_orders():
    orders = {tuple(map(tuple, epoch_batches(50, 4, 0, 1, epoch))) for epoch in range(10)}
    assert len(orders) == 10
    assert epoch_batches(50, 4, 0, 1, 0, seed=1) != epoch_batches(50, 4, 0, 1, 0, seed=2)


def test_without_shuffle_the_order_is_the_data_set_order_dealt_out_to_ranks():
    assert epoch_batches(10, 2, 1, 3, epoch=4, shuffle=False) == [[1, 4], [7]]
    assert epoch_batches(10, 2, 0, 3, epoch=0, shuffle=False) == [[0, 3], [6]]


@pytest.mark.parametrize("length, world, batch_size", SHAPES)
def test_resuming_at_a_batch_yields_exactly_the_rest_of_the_uninterrupted_epoch(length, world, batch_size):
    for rank in range(world):
        full = epoch_batches(length, batch_size, rank, world, epoch=3, seed=11)
        for start in range(len(full) + 1):
            sampler = ResumableSampler(length, batch_size, rank=rank, world_size=world, seed=11)
            sampler.set_position(3, start)
            assert len(sampler) == len(full) - start
            assert list(sampler) == full[start:]


def test_a_resumed_run_sees_every_sample_of_the_interrupted_epoch_exactly_once():
    interrupted = ResumableSampler(30, 4, seed=3)
    interrupted.set_position(2)
    before = list(itertools.islice(iter(interrupted), 5))  # killed after 5 batches
    resumed = ResumableSampler(30, 4, seed=3)  # a new process
    resumed.set_position(2, start_batch=5)
    after = list(resumed)
    assert sorted(i for b in before + after for i in b) == list(range(30))


@pytest.mark.parametrize("length, world, batch_size, expected", [
    (10, 1, 3, 4), (10, 3, 2, 2), (100, 4, 7, 4), (7, 7, 1, 1), (33, 2, 32, 1), (64, 8, 5, 2), (12, 2, 3, 2),
])
def test_batches_per_epoch_counts_the_last_short_batch(length, world, batch_size, expected):
    sampler = ResumableSampler(length, batch_size, world_size=world)
    assert sampler.batches_per_epoch() == expected == len(sampler) == len(list(sampler))


@pytest.mark.parametrize("kwargs, message", [
    (dict(length=10, batch_size=2, rank=-1, world_size=2), "rank -1"),
    (dict(length=10, batch_size=2, rank=2, world_size=2), "rank 2"),
    (dict(length=10, batch_size=0), "batch_size"),
    (dict(length=10, batch_size=-3), "batch_size"),
    (dict(length=3, batch_size=2, rank=0, world_size=4), "fewer than the 4 workers"),
    (dict(length=10, batch_size=2, rank=0, world_size=0), "world_size 0"),
])
def test_impossible_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResumableSampler(**kwargs)
