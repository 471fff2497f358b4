"""Retention: which committed checkpoints to keep, and the cleanup that deletes the rest.

Three steps, kept apart so that the decision can be tested without any storage (Orbax's split of
*what to keep* from *how bytes go away*):

    collect(store)       what the store holds: manifests, aliases, live leases, leftover folders
    plan(policy, ...)    pure: a keep/delete `Decision`, with its reasons, for every checkpoint
    apply(store, plan)   deletes, after re-checking each lineage against a fresh listing

`prune` runs the three. A checkpoint is kept if any rule keeps it (DESIGN invariant 5).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from . import faults
from .errors import InvalidName, UnreadableFile
from .lease import Lease
from .manifest import Manifest, utcnow
from .names import validate_checkpoint_id
from .retention_policy import RetentionPolicy, format_duration
from .store import CheckpointStore

__all__ = ["Decision", "RetentionInputs", "RetentionPlan", "RetentionPolicy", "apply", "collect", "format_duration",
           "plan", "prune"]

log = logging.getLogger("baton.ckpt")

# A live writer resumed from what was the latest checkpoint when its block started and may have
# committed one since; which one it resumed from is not recorded, so the newest two stand in for
# "the one it is writing after" and "the one it may still be loading".
LEASED_KEEP = 2
NO_RULE = "no rule keeps it"
LEFTOVER_DELETE = "uncommitted leftover older than ttl"
LEFTOVER_YOUNG = "uncommitted, younger than ttl: a save may be in progress"
LEFTOVER_LEASED = "uncommitted, newer than the latest while a lease is live: the writer may be saving it"
LEFTOVER_FOREIGN = "not named like a checkpoint (epoch-step): not Baton's, left alone"
DAMAGED = "its files fail verification: a damaged checkpoint counts toward no keep rule"
LATEST_DAMAGED = "latest of lineage, though damaged: none of its checkpoints verifies"
TEMP_DELETE = "temporary file of a failed atomic write, older than ttl"
TEMP_YOUNG = "temporary file younger than ttl: an atomic write may be in progress"

Kind = Literal["checkpoint", "leftover", "temp"]
WholeKey = tuple[str, str, datetime]  # (lineage, id, created_at): a re-committed checkpoint is a new key

class Decision(BaseModel):
    """What retention does with one checkpoint folder (or leftover file), and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lineage: str
    id: str = Field(description="The checkpoint id; for a temporary file, its path inside the lineage.")
    action: Literal["keep", "delete"]
    reasons: list[str] = Field(description="Every rule that keeps it, or why it goes.")
    bytes: int = Field(default=0, ge=0, description="From the manifest (leftovers: 0); after apply, what was removed.")
    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    committed: bool = Field(default=True, description="False for a leftover folder without a manifest.")
    kind: Kind = Field(default="checkpoint", description="A committed checkpoint, a leftover folder without a "
                       "manifest, or a temporary file of a failed atomic write.")
    created_at: datetime | None = Field(default=None, description="From the manifest: tells a re-committed "
                                        "(repaired) checkpoint from the one planned for.")
    verified: bool = Field(default=False, description="Its files were hashed in this pass and matched.")
    problems: list[str] = Field(default_factory=list, description="Why its files fail verification, if they do: "
                                "a damaged checkpoint counts toward no keep rule.")


class RetentionPlan(BaseModel):
    """Every decision of one retention pass; `applied` tells a plan from what `apply` did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: RetentionPolicy
    now: datetime
    decisions: list[Decision] = Field(default_factory=list)
    applied: bool = False

    @property
    def deleted(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "delete"]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "keep"]

    @property
    def bytes_freed(self) -> int:
        return sum(d.bytes for d in self.deleted)


@dataclass(frozen=True)
class RetentionInputs:
    """What `collect` read from the store: the arguments of `plan`."""

    checkpoints: list[Manifest] = field(default_factory=list)
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)
    leased: set[str] = field(default_factory=set)
    uncommitted: dict[str, dict[str, float]] = field(default_factory=dict)
    damaged: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    whole: set[WholeKey] = field(default_factory=set)
    temp_files: dict[str, dict[str, float]] = field(default_factory=dict)

    def plan(self, policy: RetentionPolicy, now: datetime) -> "RetentionPlan":
        return plan(policy, self.checkpoints, now, aliases=self.aliases, leased=self.leased,
                    uncommitted=self.uncommitted, damaged=self.damaged, whole=self.whole,
                    temp_files=self.temp_files)


# ---- planning (pure) -----------------------------------------------------------------------
def plan(policy: RetentionPolicy, checkpoints: list[Manifest], now: datetime, *,
         aliases: dict[str, dict[str, str]] | None = None, leased: set[str] | None = None,
         uncommitted: dict[str, dict[str, float]] | None = None,
         damaged: dict[str, dict[str, list[str]]] | None = None, whole: set[WholeKey] | None = None,
         temp_files: dict[str, dict[str, float]] | None = None) -> RetentionPlan:
    """Decide, without touching storage, what to keep and what to delete.

    `aliases` maps lineage -> alias -> checkpoint id; `leased` names the lineages whose lease
    holder is alive; `uncommitted` maps lineage -> leftover folder -> age in seconds of its
    newest file; `damaged` maps lineage -> checkpoint id -> why its files fail verification
    (those count toward no keep rule); `whole` holds the (lineage, id, created_at) of those found
    to verify;
    `temp_files` maps lineage -> temporary file -> age. A naive `now` (or created_at) is UTC.
    """
    now, aliases, leased, uncommitted = _aware(now), aliases or {}, leased or set(), uncommitted or {}
    damaged, whole, temp_files = damaged or {}, whole or set(), temp_files or {}
    by_lineage: dict[str, dict[str, Manifest]] = {}
    for manifest in checkpoints:
        by_lineage.setdefault(manifest.lineage, {})[manifest.id] = manifest
    decisions = []
    for lineage in sorted(set(by_lineage) | set(uncommitted) | set(temp_files)):
        # Ids sort in (epoch, step) order, so "newest" is by id, not by a clock.
        manifests = [by_lineage.get(lineage, {})[i] for i in sorted(by_lineage.get(lineage, {}))]
        bad = damaged.get(lineage, {})
        reasons = _keep_reasons(policy, manifests, now, aliases.get(lineage, {}), lineage in leased, set(bad))
        decisions += [_committed_decision(m, reasons[m.id], bad.get(m.id, []), _key(m) in whole)
                      for m in manifests]
        good = [m.id for m in manifests if m.id not in bad]
        leftovers = uncommitted.get(lineage, {})
        decisions += _leftover_decisions(policy, lineage, leftovers, good[-1] if good else None, lineage in leased)
        decisions += _temp_decisions(policy, lineage, temp_files.get(lineage, {}), set(leftovers))
    decisions.sort(key=lambda d: (d.lineage, d.id, d.committed))
    return RetentionPlan(policy=policy, now=now, decisions=decisions)


def _keep_reasons(policy: RetentionPolicy, manifests: list[Manifest], now: datetime,
                  pins: dict[str, str], leased: bool, damaged: set[str]) -> dict[str, list[str]]:
    """id -> every rule that keeps it, for one lineage's manifests (oldest first)."""
    reasons: dict[str, list[str]] = {m.id: [] for m in manifests}

    def keep(ids, why: str) -> None:
        for ckpt_id in ids:
            if ckpt_id in reasons:  # a pin may name a checkpoint deleted by hand
                reasons[ckpt_id].append(why)

    newest_first = [m.id for m in reversed(manifests)]
    good = [m for m in manifests if m.id not in damaged]
    latest, *counting = _counting_rules(policy, good)
    keep(*latest)  # the newest good checkpoint: first among the reasons, as it is first in importance
    if not good:  # nothing verifies: never empty a lineage, the newest may still be salvaged by hand
        keep(newest_first[:1], LATEST_DAMAGED)
    for alias, ckpt_id in sorted(pins.items()):
        keep([ckpt_id], f"pinned as {alias}")
    if leased:  # damaged ones too: the live writer may be replacing one right now
        keep(newest_first[:LEASED_KEEP], "live lease")
    if policy.min_age > timedelta(0):
        young = [m.id for m in manifests if now - _aware(m.created_at) < policy.min_age]
        keep(young, f"younger than min_age {format_duration(policy.min_age)}")
    if not policy.has_keep_rule:
        keep(newest_first, "no keep rule set: committed checkpoints are all kept")
    for ids, why in counting:
        keep(ids, why)
    return reasons


def _counting_rules(policy: RetentionPolicy, good: list[Manifest]) -> list[tuple[list[str], str]]:
    """The rules that count checkpoints, over the lineage's good ones (oldest first): the latest
    first, then keep_last, keep_best and keep_every when set."""
    newest_first = [m.id for m in reversed(good)]
    rules = [(newest_first[:1], "latest of lineage")]
    if policy.keep_last is not None:
        rules.append((newest_first[: policy.keep_last], f"keep_last={policy.keep_last}"))
    if policy.keep_best is not None:
        rules.append((_best_ids(good, policy), f"best {policy.keep_best} by {policy.metric} ({policy.mode})"))
    if policy.keep_every is not None:
        rules.append((_every_ids(good, policy.keep_every), f"keep_every={policy.keep_every} epochs"))
    return rules


def _best_ids(manifests: list[Manifest], policy: RetentionPolicy) -> list[str]:
    # A NaN or infinite metric is a diverged run, not a best one.
    scored = [m for m in manifests if math.isfinite(m.metrics.get(policy.metric, math.nan))]
    sign = 1 if policy.mode == "min" else -1
    newest_first = sorted(scored, key=lambda m: m.id, reverse=True)
    # sorted() is stable, so ties go to the newest, as in CheckpointStore.best.
    ranked = sorted(newest_first, key=lambda m: sign * m.metrics[policy.metric])
    return [m.id for m in ranked[: policy.keep_best]]


def _every_ids(manifests: list[Manifest], period: int) -> list[str]:
    newest_at: dict[int, str] = {}
    for manifest in manifests:  # oldest first: the last one written per boundary wins
        if manifest.position.epoch_complete and manifest.epochs_done % period == 0:
            newest_at[manifest.epochs_done] = manifest.id
    return list(newest_at.values())


def _committed_decision(manifest: Manifest, reasons: list[str], problems: list[str], verified: bool) -> Decision:
    return Decision(
        lineage=manifest.lineage, id=manifest.id, action="keep" if reasons else "delete",
        reasons=reasons or [DAMAGED if problems else NO_RULE], bytes=manifest.total_bytes, epoch=manifest.epoch,
        step=manifest.step, metrics=manifest.metrics, created_at=manifest.created_at,
        verified=verified and not problems, problems=problems,
    )


def _leftover_decisions(policy: RetentionPolicy, lineage: str, ages: dict[str, float],
                        latest: str | None, leased: bool) -> list[Decision]:
    decisions = []
    for ckpt_id, age_s in sorted(ages.items()):
        why_keep = _leftover_keep_reason(policy, ckpt_id, age_s, latest, leased)
        epoch, step = _parse_id(ckpt_id)
        decisions.append(Decision(
            lineage=lineage, id=ckpt_id, action="keep" if why_keep else "delete",
            reasons=[why_keep or LEFTOVER_DELETE], epoch=epoch, step=step, committed=False, kind="leftover",
        ))
    return decisions


def _leftover_keep_reason(policy: RetentionPolicy, ckpt_id: str, age_s: float,
                          latest: str | None, leased: bool) -> str | None:
    if _parse_id(ckpt_id) == (None, None):
        return LEFTOVER_FOREIGN
    # A live writer's next save lands after the latest good checkpoint (it resumes from there);
    # deleting its files before its manifest is written would commit a checkpoint with missing
    # files, whatever the ttl says.
    if leased and (latest is None or ckpt_id > latest):
        return LEFTOVER_LEASED
    if age_s < policy.uncommitted_ttl.total_seconds():
        return LEFTOVER_YOUNG
    return None


def _temp_decisions(policy: RetentionPolicy, lineage: str, ages: dict[str, float],
                    leftover_folders: set[str]) -> list[Decision]:
    # A temporary file inside a leftover folder goes (or stays) with its folder.
    return [Decision(lineage=lineage, id=path, committed=False, kind="temp",
                     action="keep" if age_s < policy.uncommitted_ttl.total_seconds() else "delete",
                     reasons=[TEMP_YOUNG if age_s < policy.uncommitted_ttl.total_seconds() else TEMP_DELETE])
            for path, age_s in sorted(ages.items()) if path.split("/")[0] not in leftover_folders]


# ---- reading the store ---------------------------------------------------------------------
def collect(store: CheckpointStore, lineage: str | None = None, *, leftovers: bool = True,
            policy: RetentionPolicy | None = None, whole: set[WholeKey] | None = None) -> RetentionInputs:
    """Read what `plan` needs, for one lineage or every lineage of the store.

    Per lineage: the lease, one listing of manifests, the aliases and (with `leftovers`) one
    recursive listing for manifest-less folders and temporary files. With a `policy`, the files
    of the checkpoints that its counting rules would keep are hashed (see `_find_damaged`);
    `whole` names checkpoints already found whole, which are not hashed again.
    """
    inputs = RetentionInputs(whole=set(whole or ()))
    for name in [lineage] if lineage is not None else store.lineages():
        # The lease is read first: a writer that starts after this only commits checkpoints newer
        # than the listing below, which the plan never sees and so never deletes.
        if _lease_is_live(store, name):
            inputs.leased.add(name)
        manifests = store.list(name)
        inputs.checkpoints.extend(manifests)
        _add(inputs.aliases, name, store.aliases(name))
        folders, temps = store.leftovers(name) if leftovers else ({}, {})
        _add(inputs.uncommitted, name, folders)
        _add(inputs.temp_files, name, temps)
        if policy is not None and policy.has_keep_rule:  # without one, nothing committed is deleted
            _add(inputs.damaged, name, _find_damaged(store, policy, manifests, inputs.whole))
    return inputs


def _add(into: dict, lineage: str, found: dict) -> None:
    if found:
        into[lineage] = found


def _find_damaged(store: CheckpointStore, policy: RetentionPolicy, manifests: list[Manifest],
                  whole: set[WholeKey]) -> dict[str, list[str]]:
    """Hash the checkpoints that the latest, keep_last and keep_best rules would keep, until all
    of those are whole: each damaged one found gives its place to the next good one.

    Only what would be kept is hashed, never what would be deleted: cleanup of many checkpoints
    costs reading keep_last + keep_best of them. keep_every counts by manifest alone (hashing one
    checkpoint per period would read most of a long lineage); a damaged one found by the other
    rules never counts for it either."""
    damaged: dict[str, list[str]] = {}
    while True:
        good = [m for m in manifests if m.id not in damaged]
        counted = {i for ids, _ in _counting_rules(policy.model_copy(update={"keep_every": None}), good) for i in ids}
        todo = [m for m in good if m.id in counted and _key(m) not in whole]
        if not todo:
            return damaged
        for manifest in todo:
            problems = store.verify(manifest)
            if problems:
                log.warning("checkpoint %s/%s is damaged (%s): it counts toward no keep rule",
                            manifest.lineage, manifest.id, "; ".join(problems))
                damaged[manifest.id] = problems
            else:
                whole.add(_key(manifest))


def _lease_is_live(store: CheckpointStore, lineage: str) -> bool:
    try:
        record = Lease.current(store, lineage)
    except UnreadableFile as err:  # an unreadable lease protects like a live one: never guess "dead"
        log.warning("treating the lease of lineage %s as live: %s", lineage, err)
        return True
    return record is not None and record.holder_alive()


# ---- deleting ------------------------------------------------------------------------------
def apply(store: CheckpointStore, retention_plan: RetentionPlan) -> RetentionPlan:
    """Delete what `retention_plan` marks for deletion and return what was done.

    A checkpoint goes through `store.delete`, which removes the manifest first (un-commit), then
    the files: a crash part-way leaves a manifest-less folder that a later run removes at once
    (it carries a deletion marker), so re-running finishes the job.
    """
    done = list(retention_plan.kept)
    for lineage in sorted({d.lineage for d in retention_plan.deleted}):
        planned = [d for d in retention_plan.deleted if d.lineage == lineage]
        done += _apply_lineage(store, retention_plan, lineage, planned)
    done.sort(key=lambda d: (d.lineage, d.id, d.committed))
    return retention_plan.model_copy(update={"decisions": done, "applied": True})


def _apply_lineage(store: CheckpointStore, retention_plan: RetentionPlan, lineage: str,
                   planned: list[Decision]) -> list[Decision]:
    # Re-plan on a fresh listing right before deleting. Training only commits ids newer than the
    # latest, so a planned deletion cannot become the latest through training; it can if someone
    # deleted the newer ones since (another prune, `baton ckpt rm`), or if a damaged checkpoint was
    # re-committed whole (a repair), and a pin or a live lease may have appeared. Deleting only
    # what both plans agree on catches all of these, and a commit that lands meanwhile can never
    # widen the deletion. The cost is one more listing of this lineage; what was found whole is
    # not hashed again (a repaired checkpoint has a new manifest, and so a new key: it is).
    whole = {(d.lineage, d.id, d.created_at) for d in retention_plan.decisions if d.verified}
    fresh = collect(store, lineage, leftovers=any(not d.committed for d in planned),
                    policy=retention_plan.policy, whole=whole)
    # Never an earlier clock than the plan's: a caller may plan at a `now` of its choosing.
    recheck = fresh.plan(retention_plan.policy, max(retention_plan.now, utcnow()))
    verdicts = {(d.id, d.kind): d for d in recheck.decisions}
    done = []
    # Oldest first: a crash part-way leaves the newer, more useful checkpoints.
    for decision in sorted(planned, key=lambda d: d.id):
        verdict = verdicts.get((decision.id, decision.kind))
        if verdict is None:
            done.append(decision.model_copy(update={"bytes": 0, "reasons": [*decision.reasons, "already gone"]}))
        elif verdict.action == "keep":
            reasons = [f"re-checked before deleting: {r}" for r in verdict.reasons]
            done.append(decision.model_copy(update={"action": "keep", "reasons": reasons}))
        else:
            done.append(decision.model_copy(update={"bytes": _delete(store, decision)}))
    return done


def _delete(store: CheckpointStore, decision: Decision) -> int:
    if decision.kind == "checkpoint":
        freed = store.delete(decision.lineage, decision.id)
    elif decision.kind == "leftover":
        freed = store.remove_leftover(decision.lineage, decision.id)
    else:
        freed = store.remove_temp_file(decision.lineage, decision.id)
    log.info("deleted %s/%s (%d bytes): %s", decision.lineage, decision.id, freed, "; ".join(decision.reasons))
    return freed


def prune(store: CheckpointStore, policy: RetentionPolicy, lineage: str | None = None,
          dry_run: bool = False, now: datetime | None = None) -> RetentionPlan:
    """Collect, plan and (unless `dry_run`) apply `policy` to one lineage or the whole store."""
    faults.check_env()  # a drill's BATON_FAULTS with a typo fails here, before anything is deleted
    planned = collect(store, lineage, policy=policy).plan(policy, now or utcnow())
    return planned if dry_run else apply(store, planned)


# ---- small helpers -------------------------------------------------------------------------
def _key(manifest: Manifest) -> WholeKey:
    return manifest.lineage, manifest.id, manifest.created_at


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _parse_id(ckpt_id: str) -> tuple[int | None, int | None]:
    try:
        epoch, step = validate_checkpoint_id(ckpt_id).split("-")
    except InvalidName:
        return None, None
    return int(epoch), int(step)
