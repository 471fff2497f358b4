"""Retention: the policy model, the pure planner (examples and properties), and prune on a real disk store."""

from __future__ import annotations

import math
import os
import time
from datetime import datetime, timedelta, timezone

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ckpt.lease import Lease
from ckpt.manifest import FileEntry, Manifest, Position
from ckpt.names import checkpoint_id
from ckpt.retention import (
    DAMAGED,
    LATEST_DAMAGED,
    LEFTOVER_DELETE,
    LEFTOVER_FOREIGN,
    LEFTOVER_LEASED,
    LEFTOVER_YOUNG,
    NO_RULE,
    RetentionPlan,
    RetentionPolicy,
    apply,
    collect,
    format_duration,
    plan,
    prune,
)
from ckpt.state import TrainingState, encode
from ckpt.store import CheckpointStore

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


def make(lineage="run", epoch=0, step=1, complete=True, metrics=None, age_s=86400.0, size=100) -> Manifest:
    return Manifest(
        lineage=lineage, id=checkpoint_id(epoch, step),
        position=Position(epoch=epoch, batch_in_epoch=0, epoch_complete=complete, step=step),
        files={"model.safetensors": FileEntry(size=size, sha256="0" * 64)}, digest="d" * 64,
        metrics={} if metrics is None else metrics, created_at=NOW - timedelta(seconds=age_s),
    )


def epochs(n: int, lineage="run", **kwargs) -> list[Manifest]:
    """One end-of-epoch checkpoint per epoch, 10 steps an epoch."""
    return [make(lineage, epoch=e, step=10 * (e + 1), **kwargs) for e in range(n)]


def actions(retention_plan: RetentionPlan) -> dict[str, str]:
    return {d.id: d.action for d in retention_plan.decisions}


def kept_ids(retention_plan: RetentionPlan, committed=True) -> set[str]:
    return {d.id for d in retention_plan.kept if d.committed == committed}


# ---- the policy ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("90s", timedelta(seconds=90)), ("10m", timedelta(minutes=10)), ("2h", timedelta(hours=2)),
    ("7d", timedelta(days=7)), ("1h30m", timedelta(minutes=90)), ("PT1H", timedelta(hours=1)),
    ("P7D", timedelta(days=7)), ("3600", timedelta(hours=1)), (90, timedelta(seconds=90)),
])
def test_durations_accept_short_forms_iso_8601_and_seconds(text, expected):
    assert RetentionPolicy(min_age=text).min_age == expected
    assert RetentionPolicy(uncommitted_ttl=text).uncommitted_ttl == expected


@pytest.mark.parametrize("bad, field", [
    ({"keep_last": 0}, "keep_last"), ({"keep_best": -1}, "keep_best"), ({"keep_every": 0}, "keep_every"),
    ({"mode": "average"}, "mode"), ({"metric": ""}, "metric"), ({"min_age": "soon"}, "min_age"),
    ({"min_age": "-PT1H"}, "min_age"), ({"uncommitted_ttl": "0s"}, "uncommitted_ttl"),
    ({"keep_lst": 3}, "keep_lst"),
])
def test_an_invalid_policy_names_the_field_at_fault(bad, field):
    with pytest.raises(ValidationError) as info:
        RetentionPolicy(**bad)
    assert info.value.errors()[0]["loc"] == (field,)
    assert field in str(info.value)


def test_every_policy_field_is_described():
    assert all(f.description for f in RetentionPolicy.model_fields.values())


def test_format_duration_is_compact():
    assert [format_duration(timedelta(seconds=s)) for s in (0, 90, 3600, 7 * 86400)] == ["0s", "1m30s", "1h", "7d"]


# ---- planning: examples --------------------------------------------------------------------
def test_keep_last_three_deletes_the_older_ones_and_says_why():
    result = plan(RetentionPolicy(keep_last=3), epochs(6), NOW)
    assert [d.action for d in result.decisions] == ["delete"] * 3 + ["keep"] * 3
    assert result.deleted[0].reasons == [NO_RULE]
    assert result.kept[-1].reasons == ["latest of lineage", "keep_last=3"]
    assert result.kept[0].reasons == ["keep_last=3"]
    assert result.bytes_freed == 300


def test_the_latest_checkpoint_survives_even_a_policy_that_keeps_one_best_elsewhere():
    checkpoints = [make(epoch=0, step=10, metrics={"loss": 0.1}), make(epoch=1, step=20, metrics={"loss": 0.9})]
    result = plan(RetentionPolicy(keep_best=1), checkpoints, NOW)
    assert result.deleted == []
    assert result.kept[0].reasons == ["best 1 by loss (min)"]
    assert result.kept[1].reasons == ["latest of lineage"]


def test_a_pinned_checkpoint_survives_with_its_alias_as_the_reason():
    checkpoints = epochs(4)
    result = plan(RetentionPolicy(keep_last=1), checkpoints, NOW, aliases={"run": {"production": checkpoints[0].id}})
    assert actions(result) == {checkpoints[0].id: "keep", checkpoints[1].id: "delete",
                               checkpoints[2].id: "delete", checkpoints[3].id: "keep"}
    assert result.kept[0].reasons == ["pinned as production"]


def test_a_live_lease_keeps_the_newest_two():
    result = plan(RetentionPolicy(keep_last=1), epochs(4), NOW, leased={"run"})
    assert [d.action for d in result.decisions] == ["delete", "delete", "keep", "keep"]
    assert result.kept[0].reasons == ["live lease"]


def test_checkpoints_lacking_the_metric_or_with_nan_never_count_as_best():
    checkpoints = [make(epoch=0, step=10), make(epoch=1, step=20, metrics={"loss": math.nan}),
                   make(epoch=2, step=30, metrics={"loss": 5.0}), make(epoch=3, step=40, metrics={"acc": 1.0})]
    result = plan(RetentionPolicy(keep_best=2), checkpoints, NOW)
    assert [d.action for d in result.decisions] == ["delete", "delete", "keep", "keep"]
    assert result.kept[0].reasons == ["best 2 by loss (min)"]


def test_max_mode_keeps_the_highest_accuracy_and_ties_go_to_the_newest():
    accs = [0.5, 0.9, 0.7, 0.9, 0.1]
    checkpoints = [make(epoch=e, step=10 * (e + 1), metrics={"acc": a}) for e, a in enumerate(accs)]
    result = plan(RetentionPolicy(keep_best=1, metric="acc", mode="max"), checkpoints, NOW)
    assert kept_ids(result) == {checkpoints[3].id, checkpoints[4].id}
    assert "best 1 by acc (max)" in result.kept[0].reasons


def test_keep_every_keeps_the_end_of_epoch_checkpoint_on_each_period_only():
    checkpoints = [
        make(epoch=1, step=15, complete=False),  # mid-epoch 1: epochs_done 1
        make(epoch=1, step=20, complete=True),   # end of epoch 1: epochs_done 2  <- kept
        make(epoch=2, step=25, complete=False),  # mid-epoch 2: epochs_done 2, but not an epoch end
        make(epoch=2, step=30, complete=True),   # epochs_done 3
        make(epoch=3, step=35, complete=False),  # epochs_done 3
        make(epoch=3, step=40, complete=True),   # epochs_done 4  <- kept
        make(epoch=4, step=45, complete=False),  # latest
    ]
    result = plan(RetentionPolicy(keep_every=2), checkpoints, NOW)
    assert kept_ids(result) == {checkpoint_id(1, 20), checkpoint_id(3, 40), checkpoint_id(4, 45)}
    assert result.kept[0].reasons == ["keep_every=2 epochs"]


def test_min_age_protects_young_checkpoints_from_every_rule():
    checkpoints = [make(epoch=e, step=10 * (e + 1), age_s=age) for e, age in enumerate([7200, 1800, 60, 0])]
    result = plan(RetentionPolicy(keep_last=1, min_age="1h"), checkpoints, NOW)
    assert [d.action for d in result.decisions] == ["delete", "keep", "keep", "keep"]
    assert result.kept[0].reasons == ["younger than min_age 1h"]


def test_a_policy_without_keep_rules_deletes_no_committed_checkpoint():
    result = plan(RetentionPolicy(min_age="1d"), epochs(5), NOW, uncommitted={"run": {checkpoint_id(9, 99): 1e6}})
    assert [d.id for d in result.deleted] == [checkpoint_id(9, 99)]
    assert len(kept_ids(result)) == 5


def test_lineages_are_planned_independently():
    result = plan(RetentionPolicy(keep_last=1), epochs(3, "a") + epochs(2, "b"), NOW)
    assert {(d.lineage, d.id) for d in result.kept} == {("a", checkpoint_id(2, 30)), ("b", checkpoint_id(1, 20))}


def test_old_leftovers_are_deleted_and_young_or_foreign_ones_kept():
    leftovers = {"run": {checkpoint_id(0, 5): 7200.0, checkpoint_id(0, 6): 60.0, "ray-tmp": 1e9}}
    result = plan(RetentionPolicy(), epochs(2), NOW, uncommitted=leftovers)
    leftover = {d.id: (d.action, d.reasons) for d in result.decisions if not d.committed}
    assert leftover == {checkpoint_id(0, 5): ("delete", [LEFTOVER_DELETE]),
                        checkpoint_id(0, 6): ("keep", [LEFTOVER_YOUNG]),
                        "ray-tmp": ("keep", [LEFTOVER_FOREIGN])}


def test_an_old_leftover_newer_than_the_latest_is_kept_while_a_lease_is_live():
    leftovers = {"run": {checkpoint_id(0, 5): 1e6, checkpoint_id(5, 99): 1e6}}
    result = plan(RetentionPolicy(), epochs(2), NOW, leased={"run"}, uncommitted=leftovers)
    assert actions(result)[checkpoint_id(0, 5)] == "delete"
    assert actions(result)[checkpoint_id(5, 99)] == "keep"
    assert result.kept[-1].reasons == [LEFTOVER_LEASED]


# ---- planning: properties ------------------------------------------------------------------
@st.composite
def lineage_history(draw, lineage: str) -> list[Manifest]:
    epoch, step, out = 0, 0, []
    for _ in range(draw(st.integers(1, 10))):
        epoch += draw(st.integers(0, 2))
        step += draw(st.integers(1, 30))
        loss = draw(st.sampled_from([None, 0.1, 0.2, 0.2, 0.5, math.nan]))
        acc = draw(st.sampled_from([None, 0.3, 0.9, 0.9]))
        metrics = {k: v for k, v in (("loss", loss), ("acc", acc)) if v is not None}
        out.append(make(lineage, epoch, step, draw(st.booleans()), metrics,
                        age_s=draw(st.sampled_from([0, 600, 4000, 86400 * 3])), size=draw(st.integers(0, 10**6))))
    return out


@st.composite
def scenarios(draw):
    names = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
    checkpoints = [m for name in names for m in draw(lineage_history(name))]
    aliases = {}
    for name in names:
        ids = [m.id for m in checkpoints if m.lineage == name]
        pinned = draw(st.lists(st.sampled_from(ids), max_size=2))
        if pinned:
            aliases[name] = {f"pin{i}": ckpt for i, ckpt in enumerate(pinned)}
    leased = set(draw(st.lists(st.sampled_from(names), unique=True)))
    damaged = {}
    for name in names:
        ids = [m.id for m in checkpoints if m.lineage == name]
        hit = draw(st.lists(st.sampled_from(ids), unique=True, max_size=len(ids)))  # all of them, at times
        if hit:
            damaged[name] = {ckpt: [f"model.safetensors: damaged ({ckpt})"] for ckpt in hit}
    policy = RetentionPolicy(
        keep_last=draw(st.none() | st.integers(1, 4)), keep_best=draw(st.none() | st.integers(1, 3)),
        metric=draw(st.sampled_from(["loss", "acc"])), mode=draw(st.sampled_from(["min", "max"])),
        keep_every=draw(st.none() | st.integers(1, 3)), min_age=draw(st.sampled_from([0, 3600])),
    )
    return policy, checkpoints, aliases, leased, damaged


def by_lineage(checkpoints: list[Manifest]) -> dict[str, list[Manifest]]:
    out: dict[str, list[Manifest]] = {}
    for m in sorted(checkpoints, key=lambda m: m.id):
        out.setdefault(m.lineage, []).append(m)
    return out


def with_reason(retention_plan: RetentionPlan, lineage: str, reason: str) -> set[str]:
    return {d.id for d in retention_plan.decisions if d.lineage == lineage and reason in d.reasons}


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(scenarios())
def test_the_newest_good_pinned_and_leased_checkpoints_are_never_deleted(scenario):
    policy, checkpoints, aliases, leased, damaged = scenario
    result = plan(policy, checkpoints, NOW, aliases=aliases, leased=leased, damaged=damaged)
    deleted = {(d.lineage, d.id) for d in result.deleted}
    for lineage, history in by_lineage(checkpoints).items():
        good = good_ones(history, damaged, lineage)
        newest = good[-1:] or history[-1:]  # with nothing good, the newest damaged one stays
        protected = {m.id for m in newest} | set(aliases.get(lineage, {}).values())
        if lineage in leased:
            protected |= {m.id for m in history[-2:]}
        assert not {(lineage, i) for i in protected} & deleted


@PROPERTY
@given(scenarios())
def test_a_checkpoint_is_deleted_exactly_when_no_rule_keeps_it(scenario):
    policy, checkpoints, aliases, leased, damaged = scenario
    result = plan(policy, checkpoints, NOW, aliases=aliases, leased=leased, damaged=damaged)
    assert len(result.decisions) == len(checkpoints)
    for decision in result.decisions:
        is_damaged = decision.id in damaged.get(decision.lineage, {})
        assert (decision.action == "delete") == (decision.reasons == [DAMAGED if is_damaged else NO_RULE])
        assert bool(decision.problems) == is_damaged
    assert result.bytes_freed == sum(m.total_bytes for m in checkpoints if (m.lineage, m.id) in
                                     {(d.lineage, d.id) for d in result.deleted})
    if not policy.has_keep_rule:
        assert result.deleted == []


@PROPERTY
@given(scenarios())
def test_planning_again_over_the_survivors_deletes_nothing_more(scenario):
    policy, checkpoints, aliases, leased, damaged = scenario
    first = plan(policy, checkpoints, NOW, aliases=aliases, leased=leased, damaged=damaged)
    survivors = [m for m in checkpoints if (m.lineage, m.id) in {(d.lineage, d.id) for d in first.kept}]
    second = plan(policy, survivors, NOW, aliases=aliases, leased=leased, damaged=damaged)
    assert second.deleted == []


@PROPERTY
@given(scenarios())
def test_each_keep_rule_keeps_exactly_what_it_defines_over_the_good_checkpoints(scenario):
    policy, checkpoints, aliases, leased, damaged = scenario
    result = plan(policy, checkpoints, NOW, aliases=aliases, leased=leased, damaged=damaged)
    for lineage, everything in by_lineage(checkpoints).items():
        history = good_ones(everything, damaged, lineage)
        assert with_reason(result, lineage, "latest of lineage") == {m.id for m in history[-1:]}
        if policy.keep_last:
            expected = {m.id for m in history[-policy.keep_last:]}
            assert with_reason(result, lineage, f"keep_last={policy.keep_last}") == expected
        if policy.keep_best:
            check_keep_best(policy, history, with_reason(result, lineage, f"best {policy.keep_best} by "
                                                                          f"{policy.metric} ({policy.mode})"))
        if policy.keep_every:
            ends = {}
            for m in history:
                if m.position.epoch_complete and m.epochs_done % policy.keep_every == 0:
                    ends[m.epochs_done] = m.id
            assert with_reason(result, lineage, f"keep_every={policy.keep_every} epochs") == set(ends.values())


@PROPERTY
@given(scenarios())
def test_a_damaged_checkpoint_counts_toward_no_keep_rule(scenario):
    policy, checkpoints, aliases, leased, damaged = scenario
    result = plan(policy, checkpoints, NOW, aliases=aliases, leased=leased, damaged=damaged)
    counting = ("keep_last=", "best ", "keep_every=")
    for decision in result.decisions:
        if decision.id in damaged.get(decision.lineage, {}):
            assert not [r for r in decision.reasons if r.startswith(counting) or r == "latest of lineage"], decision


def good_ones(history: list[Manifest], damaged: dict[str, dict[str, list[str]]], lineage: str) -> list[Manifest]:
    return [m for m in history if m.id not in damaged.get(lineage, {})]


def check_keep_best(policy: RetentionPolicy, history: list[Manifest], best: set[str]) -> None:
    scored = {m.id: m.metrics[policy.metric] for m in history if math.isfinite(m.metrics.get(policy.metric, math.nan))}
    assert best <= set(scored)
    assert len(best) == min(policy.keep_best, len(scored))
    better = (lambda a, b: a <= b) if policy.mode == "min" else (lambda a, b: a >= b)
    for winner in best:
        for loser in set(scored) - best:
            assert better(scored[winner], scored[loser])
            if scored[winner] == scored[loser]:
                assert winner > loser, "ties go to the newest"


# ---- prune on a real store -----------------------------------------------------------------
def commit(store: CheckpointStore, lineage: str, epoch: int, loss: float):
    position = Position(epoch=epoch, batch_in_epoch=4, epoch_complete=True, step=4 * (epoch + 1))
    files = encode(TrainingState(model={"w": torch.full((3,), float(epoch))}, position=position))
    return store.commit(lineage, position, files, metrics={"loss": loss})


def leftover(store: CheckpointStore, lineage: str, ckpt_id: str, age_s: float) -> str:
    folder = store.path(lineage, ckpt_id)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "wb") as handle:
        handle.write(b"x" * 64)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return folder


@pytest.fixture
def store(tmp_path) -> CheckpointStore:
    store = CheckpointStore(str(tmp_path / "store"))
    for epoch, loss in enumerate([0.9, 0.2, 0.5, 0.7, 0.6]):
        commit(store, "run", epoch, loss)
    return store


def ids(store: CheckpointStore, lineage="run") -> list[str]:
    return [m.id for m in store.list(lineage)]


def test_prune_keeps_the_best_the_latest_and_the_pinned_and_leaves_them_whole(store):
    store.pin("run", checkpoint_id(0, 4), "production")
    sizes = {m.id: m.total_bytes for m in store.list("run")}
    result = prune(store, RetentionPolicy(keep_best=1))
    assert ids(store) == [checkpoint_id(0, 4), checkpoint_id(1, 8), checkpoint_id(4, 20)]
    assert sorted(os.listdir(store.path("run"))) == ids(store) + ["_aliases"]
    assert store.verify_lineage("run") == []
    assert result.applied and {d.id for d in result.deleted} == {checkpoint_id(2, 12), checkpoint_id(3, 16)}
    assert result.bytes_freed == sizes[checkpoint_id(2, 12)] + sizes[checkpoint_id(3, 16)] > 0


def test_dry_run_plans_but_deletes_nothing(store):
    result = prune(store, RetentionPolicy(keep_last=1), dry_run=True)
    assert len(result.deleted) == 4 and not result.applied
    assert len(ids(store)) == 5


def test_prune_removes_a_leftover_older_than_the_ttl_and_keeps_a_young_one(store):
    old = leftover(store, "run", checkpoint_id(1, 5), age_s=7200)
    young = leftover(store, "run", checkpoint_id(1, 6), age_s=10)
    result = prune(store, RetentionPolicy(keep_last=5))
    assert not os.path.exists(old) and os.path.exists(young)
    assert [(d.id, d.bytes) for d in result.deleted] == [(checkpoint_id(1, 5), 64)]
    assert len(ids(store)) == 5 and store.verify_lineage("run") == []


def test_a_live_lease_in_the_store_protects_the_newest_two(store):
    lease = Lease(store, "run")
    lease.acquire()
    try:
        prune(store, RetentionPolicy(keep_last=1))
    finally:
        lease.release()
    assert ids(store) == [checkpoint_id(3, 16), checkpoint_id(4, 20)]


def test_apply_rechecks_and_spares_a_checkpoint_that_became_the_latest_or_was_pinned(store):
    inputs = collect(store)
    planned = plan(RetentionPolicy(keep_last=1), inputs.checkpoints, NOW)
    store.delete("run", checkpoint_id(4, 20))  # someone removes the newest after we planned
    store.pin("run", checkpoint_id(0, 4), "paper")  # and pins an old one
    result = apply(store, planned)
    assert ids(store) == [checkpoint_id(0, 4), checkpoint_id(3, 16)]
    reasons = {d.id: d.reasons for d in result.decisions}
    assert reasons[checkpoint_id(3, 16)] == ["re-checked before deleting: latest of lineage",
                                             "re-checked before deleting: keep_last=1"]
    assert reasons[checkpoint_id(0, 4)] == ["re-checked before deleting: pinned as paper"]


def test_a_commit_landing_after_planning_is_never_deleted(store):
    planned = plan(RetentionPolicy(keep_last=1), collect(store).checkpoints, NOW)
    commit(store, "run", 5, 0.1)
    apply(store, planned)
    assert ids(store) == [checkpoint_id(4, 20), checkpoint_id(5, 24)]


def test_rerunning_after_a_crash_mid_delete_finishes_the_job(store):
    policy = RetentionPolicy(keep_last=2, uncommitted_ttl="1m")
    folder = store.path("run", checkpoint_id(0, 4))
    os.remove(os.path.join(folder, "manifest.json"))  # the crash: un-committed, files left behind
    for name in os.listdir(folder):
        os.utime(os.path.join(folder, name), (time.time() - 3600, time.time() - 3600))
    prune(store, policy)
    assert not os.path.exists(folder)
    assert sorted(os.listdir(store.path("run"))) == [checkpoint_id(3, 16), checkpoint_id(4, 20)]
    assert prune(store, policy).deleted == []


def test_prune_of_one_lineage_leaves_the_others_alone(store):
    for epoch in range(3):
        commit(store, "other", epoch, 1.0)
    prune(store, RetentionPolicy(keep_last=1), lineage="other")
    assert len(ids(store)) == 5 and ids(store, "other") == [checkpoint_id(2, 12)]


# ---- damaged checkpoints on a real store ---------------------------------------------------
def spoil(store: CheckpointStore, ckpt_id: str, lineage: str = "run") -> None:
    """Flip a byte of the model file, leaving the manifest intact (bit rot, a bad disk)."""
    path = os.path.join(store.path(lineage, ckpt_id), "model.safetensors")
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 1]))


def test_cleanup_with_a_damaged_newest_keeps_the_newest_good_one_and_drops_the_damaged_one(store):
    """The reported data loss: keep_last=1 deleted every good checkpoint and kept the damaged latest."""
    spoil(store, checkpoint_id(4, 20))
    result = prune(store, RetentionPolicy(keep_last=1))
    assert ids(store) == [checkpoint_id(3, 16)] and store.verify_lineage("run") == []
    gone = {d.id: d for d in result.deleted}
    assert gone[checkpoint_id(4, 20)].reasons == [DAMAGED] and gone[checkpoint_id(4, 20)].problems
    assert {d.id: d.reasons for d in result.kept} == {checkpoint_id(3, 16): ["latest of lineage", "keep_last=1"]}


def test_a_lineage_where_nothing_verifies_keeps_its_newest_checkpoint(store):
    for ckpt_id in ids(store):
        spoil(store, ckpt_id)
    result = prune(store, RetentionPolicy(keep_last=1))
    assert ids(store) == [checkpoint_id(4, 20)]
    assert result.kept[0].reasons == [LATEST_DAMAGED] and result.kept[0].problems


def test_damaged_checkpoints_give_their_keep_last_and_keep_best_places_to_good_ones(store):
    spoil(store, checkpoint_id(3, 16))  # among the newest two
    spoil(store, checkpoint_id(1, 8))   # the best (loss 0.2)
    prune(store, RetentionPolicy(keep_last=2, keep_best=1))
    # newest two good: epochs 4 and 2; best good: epoch 2 (0.5)
    assert ids(store) == [checkpoint_id(2, 12), checkpoint_id(4, 20)] and store.verify_lineage("run") == []


def test_only_what_would_be_kept_is_hashed(store):
    spoil(store, checkpoint_id(0, 4))  # old: deleted whatever its state, so never read
    result = prune(store, RetentionPolicy(keep_last=2))
    old = next(d for d in result.decisions if d.id == checkpoint_id(0, 4))
    assert old.action == "delete" and old.reasons == [NO_RULE] and old.problems == []
    assert {d.id for d in result.decisions if d.verified} == {checkpoint_id(3, 16), checkpoint_id(4, 20)}


def test_a_pinned_damaged_checkpoint_is_kept_and_reported(store):
    spoil(store, checkpoint_id(4, 20))
    store.pin("run", checkpoint_id(4, 20), "production")
    result = prune(store, RetentionPolicy(keep_last=1))
    pinned = next(d for d in result.kept if d.id == checkpoint_id(4, 20))
    assert pinned.reasons == ["pinned as production"] and pinned.problems
    assert ids(store) == [checkpoint_id(3, 16), checkpoint_id(4, 20)]


def test_a_damaged_checkpoint_repaired_between_planning_and_deleting_is_kept(store):
    spoil(store, checkpoint_id(4, 20))
    planned = collect(store, policy=RetentionPolicy(keep_last=1)).plan(RetentionPolicy(keep_last=1), NOW)
    assert checkpoint_id(4, 20) in {d.id for d in planned.deleted}
    commit(store, "run", 4, 0.6)  # the trainer re-commits it whole
    result = apply(store, planned)
    assert ids(store) == [checkpoint_id(3, 16), checkpoint_id(4, 20)] and store.verify_lineage("run") == []
    assert next(d for d in result.decisions if d.id == checkpoint_id(4, 20)).reasons[0].startswith("re-checked")


DISK_PROPERTY = settings(max_examples=25, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@DISK_PROPERTY
@given(count=st.integers(1, 7), data=st.data(), keep_last=st.none() | st.integers(1, 3),
       keep_best=st.none() | st.integers(1, 2))
def test_on_a_real_store_the_newest_good_checkpoint_survives_every_cleanup(tmp_path_factory, count, data,
                                                                          keep_last, keep_best):
    store = CheckpointStore(str(tmp_path_factory.mktemp("store")))
    losses = data.draw(st.lists(st.sampled_from([0.1, 0.5, 0.9]), min_size=count, max_size=count))
    made = [commit(store, "run", epoch, loss) for epoch, loss in enumerate(losses)]
    spoiled = set(data.draw(st.lists(st.sampled_from([m.id for m in made]), unique=True)))
    for ckpt_id in spoiled:
        spoil(store, ckpt_id)
    good = [m.id for m in made if m.id not in spoiled]

    prune(store, RetentionPolicy(keep_last=keep_last, keep_best=keep_best))

    left = ids(store)
    if good:
        assert good[-1] in left and store.latest_verified("run").id == good[-1]
        if keep_last:
            assert set(good[-keep_last:]) <= set(left)
    if not (keep_last or keep_best):
        assert left == [m.id for m in made], "with no keep rule, nothing committed is deleted"
    elif good:
        assert not set(left) & spoiled, "a damaged checkpoint no rule keeps was left"
    else:
        assert left == [made[-1].id], "a lineage with nothing good keeps its newest checkpoint"
