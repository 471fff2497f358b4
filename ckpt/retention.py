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
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from .errors import InvalidName
from .lease import Lease
from .manifest import MANIFEST_NAME, Manifest, utcnow
from .names import validate_checkpoint_id
from .store import CheckpointStore, Mode

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

_SHORT_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIMEDELTA = TypeAdapter(timedelta)


class RetentionPolicy(BaseModel):
    """What to keep. A checkpoint survives if ANY rule keeps it.

    Always kept, whatever the policy: the latest committed checkpoint of each lineage, every
    pinned (aliased) checkpoint, and the newest two of a lineage whose lease holder is alive.
    With no keep_* rule set, no committed checkpoint is deleted (the safe default): `min_age`
    only protects, it never selects anything for deletion; only old leftovers go.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_last: int | None = Field(default=None, ge=1, description="Keep the N newest checkpoints of each lineage.")
    keep_best: int | None = Field(
        default=None, ge=1,
        description="Keep the K best checkpoints of each lineage by `metric`; those lacking it "
        "(or with a NaN or infinite value) never count as best. Ties go to the newest.",
    )
    metric: str = Field(default="loss", min_length=1, description="The metric `keep_best` ranks by.")
    mode: Mode = Field(default="min", description="'min' when a lower `metric` is better (a loss), else 'max'.")
    keep_every: int | None = Field(
        default=None, ge=1,
        description="Keep one checkpoint per N epochs, like Orbax's keep_period: for every epochs_done "
        "that is a multiple of N, the newest end-of-epoch checkpoint (epoch_complete) with that "
        "epochs_done. Mid-epoch checkpoints never count.",
    )
    min_age: timedelta = Field(
        default=timedelta(0),
        description="Never delete a checkpoint younger than this (by created_at). Accepts '90s', "
        "'10m', '2h', '7d', '1w', '1h30m', seconds, or ISO 8601 ('PT1H', 'P7D').",
    )
    uncommitted_ttl: timedelta = Field(
        default=timedelta(hours=1),
        description="Remove checkpoint folders without a manifest once their newest file is older "
        "than this; younger ones are kept, since a save may be in progress. Same formats as min_age.",
    )

    @field_validator("min_age", "uncommitted_ttl", mode="before")
    @classmethod
    def _parse_duration(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return timedelta(seconds=float(text))
        if text and re.fullmatch(rf"(?:\s*{_SHORT_DURATION.pattern}\s*)+", text, re.IGNORECASE):
            parts = _SHORT_DURATION.findall(text)
            return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u.lower()] for n, u in parts))
        try:
            return _TIMEDELTA.validate_python(text)
        except ValidationError as err:
            raise ValueError(
                f"{info.field_name}: cannot read {value!r} as a duration; write it like '90s', '10m', "
                "'2h', '7d' or as ISO 8601 ('PT1H', 'P7D')"
            ) from err

    @field_validator("min_age", "uncommitted_ttl")
    @classmethod
    def _check_sign(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        if value < timedelta(0):
            shown = format_duration(-value)
            raise ValueError(f"{info.field_name} must not be negative (got -{shown}); use 0 to turn it off")
        if info.field_name == "uncommitted_ttl" and value == timedelta(0):
            raise ValueError(
                "uncommitted_ttl must be positive: a save writes its files before its manifest, "
                "and a zero ttl would delete a save in progress. Try '1h'."
            )
        return value

    @property
    def has_keep_rule(self) -> bool:
        return any(rule is not None for rule in (self.keep_last, self.keep_best, self.keep_every))


class Decision(BaseModel):
    """What retention does with one checkpoint folder, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lineage: str
    id: str
    action: Literal["keep", "delete"]
    reasons: list[str] = Field(description="Every rule that keeps it, or why it goes.")
    bytes: int = Field(default=0, ge=0, description="From the manifest (leftovers: 0); after apply, what was removed.")
    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    committed: bool = Field(default=True, description="False for a leftover folder without a manifest.")


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


# ---- planning (pure) -----------------------------------------------------------------------
def plan(policy: RetentionPolicy, checkpoints: list[Manifest], now: datetime, *,
         aliases: dict[str, dict[str, str]] | None = None, leased: set[str] | None = None,
         uncommitted: dict[str, dict[str, float]] | None = None) -> RetentionPlan:
    """Decide, without touching storage, what to keep and what to delete.

    `aliases` maps lineage -> alias -> checkpoint id; `leased` names the lineages whose lease
    holder is alive; `uncommitted` maps lineage -> leftover folder -> age in seconds of its
    newest file. A naive `now` (or created_at) is taken as UTC.
    """
    now, aliases, leased, uncommitted = _aware(now), aliases or {}, leased or set(), uncommitted or {}
    by_lineage: dict[str, dict[str, Manifest]] = {}
    for manifest in checkpoints:
        by_lineage.setdefault(manifest.lineage, {})[manifest.id] = manifest
    decisions = []
    for lineage in sorted(set(by_lineage) | set(uncommitted)):
        # Ids sort in (epoch, step) order, so "newest" is by id, not by a clock.
        manifests = [by_lineage.get(lineage, {})[i] for i in sorted(by_lineage.get(lineage, {}))]
        reasons = _keep_reasons(policy, manifests, now, aliases.get(lineage, {}), lineage in leased)
        decisions += [_committed_decision(m, reasons[m.id]) for m in manifests]
        latest = manifests[-1].id if manifests else None
        decisions += _leftover_decisions(policy, lineage, uncommitted.get(lineage, {}), latest, lineage in leased)
    decisions.sort(key=lambda d: (d.lineage, d.id, d.committed))
    return RetentionPlan(policy=policy, now=now, decisions=decisions)


def _keep_reasons(policy: RetentionPolicy, manifests: list[Manifest], now: datetime,
                  pins: dict[str, str], leased: bool) -> dict[str, list[str]]:
    """id -> every rule that keeps it, for one lineage's manifests (oldest first)."""
    reasons: dict[str, list[str]] = {m.id: [] for m in manifests}

    def keep(ids, why: str) -> None:
        for ckpt_id in ids:
            if ckpt_id in reasons:  # a pin may name a checkpoint deleted by hand
                reasons[ckpt_id].append(why)

    newest_first = [m.id for m in reversed(manifests)]
    keep(newest_first[:1], "latest of lineage")
    for alias, ckpt_id in sorted(pins.items()):
        keep([ckpt_id], f"pinned as {alias}")
    if leased:
        keep(newest_first[:LEASED_KEEP], "live lease")
    if policy.min_age > timedelta(0):
        young = [m.id for m in manifests if now - _aware(m.created_at) < policy.min_age]
        keep(young, f"younger than min_age {format_duration(policy.min_age)}")
    if not policy.has_keep_rule:
        keep(newest_first, "no keep rule set: committed checkpoints are all kept")
    if policy.keep_last is not None:
        keep(newest_first[: policy.keep_last], f"keep_last={policy.keep_last}")
    if policy.keep_best is not None:
        keep(_best_ids(manifests, policy), f"best {policy.keep_best} by {policy.metric} ({policy.mode})")
    if policy.keep_every is not None:
        keep(_every_ids(manifests, policy.keep_every), f"keep_every={policy.keep_every} epochs")
    return reasons


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


def _committed_decision(manifest: Manifest, reasons: list[str]) -> Decision:
    return Decision(
        lineage=manifest.lineage, id=manifest.id, action="keep" if reasons else "delete",
        reasons=reasons or [NO_RULE], bytes=manifest.total_bytes, epoch=manifest.epoch,
        step=manifest.step, metrics=manifest.metrics,
    )


def _leftover_decisions(policy: RetentionPolicy, lineage: str, ages: dict[str, float],
                        latest: str | None, leased: bool) -> list[Decision]:
    decisions = []
    for ckpt_id, age_s in sorted(ages.items()):
        why_keep = _leftover_keep_reason(policy, ckpt_id, age_s, latest, leased)
        epoch, step = _parse_id(ckpt_id)
        decisions.append(Decision(
            lineage=lineage, id=ckpt_id, action="keep" if why_keep else "delete",
            reasons=[why_keep or LEFTOVER_DELETE], epoch=epoch, step=step, committed=False,
        ))
    return decisions


def _leftover_keep_reason(policy: RetentionPolicy, ckpt_id: str, age_s: float,
                          latest: str | None, leased: bool) -> str | None:
    if _parse_id(ckpt_id) == (None, None):
        return LEFTOVER_FOREIGN
    # A live writer's next save lands after the latest; deleting its files before its manifest
    # is written would commit a checkpoint with missing files, whatever the ttl says.
    if leased and (latest is None or ckpt_id > latest):
        return LEFTOVER_LEASED
    if age_s < policy.uncommitted_ttl.total_seconds():
        return LEFTOVER_YOUNG
    return None


# ---- reading the store ---------------------------------------------------------------------
def collect(store: CheckpointStore, lineage: str | None = None, *, leftovers: bool = True) -> RetentionInputs:
    """Read what `plan` needs, for one lineage or every lineage of the store.

    Per lineage: the lease, one listing of manifests, the aliases and (with `leftovers`) one
    recursive listing for manifest-less folders; committed checkpoints are never stat'ed, their
    sizes come from their manifests.
    """
    inputs = RetentionInputs()
    for name in [lineage] if lineage is not None else store.lineages():
        # The lease is read first: a writer that starts after this only commits checkpoints newer
        # than the listing below, which the plan never sees and so never deletes.
        if _lease_is_live(store, name):
            inputs.leased.add(name)
        inputs.checkpoints.extend(store.list(name))
        pins = store.aliases(name)
        if pins:
            inputs.aliases[name] = pins
        found = store.uncommitted(name) if leftovers else {}
        if found:
            inputs.uncommitted[name] = found
    return inputs


def _lease_is_live(store: CheckpointStore, lineage: str) -> bool:
    try:
        record = Lease.current(store, lineage)
    except ValueError as err:  # an unreadable lease protects like a live one: never guess "dead"
        log.warning("lease of lineage %s is unreadable (%s); treating it as live", lineage, err)
        return True
    return record is not None and record.holder_alive()


# ---- deleting ------------------------------------------------------------------------------
def apply(store: CheckpointStore, retention_plan: RetentionPlan,
          after_uncommit: Callable[[], None] | None = None) -> RetentionPlan:
    """Delete what `retention_plan` marks for deletion and return what was done.

    A checkpoint goes through `store.delete`, which removes the manifest first (un-commit), then
    the files: a crash part-way leaves a manifest-less folder that a later run removes once it is
    older than `uncommitted_ttl` (its files keep their old times), so re-running finishes the job.
    `after_uncommit` runs inside each deletion, between manifest and files (failure injection).
    """
    done = list(retention_plan.kept)
    for lineage in sorted({d.lineage for d in retention_plan.deleted}):
        planned = [d for d in retention_plan.deleted if d.lineage == lineage]
        done += _apply_lineage(store, retention_plan, lineage, planned, after_uncommit)
    done.sort(key=lambda d: (d.lineage, d.id, d.committed))
    return retention_plan.model_copy(update={"decisions": done, "applied": True})


def _apply_lineage(store: CheckpointStore, retention_plan: RetentionPlan, lineage: str,
                   planned: list[Decision], after_uncommit: Callable[[], None] | None) -> list[Decision]:
    # Re-plan on a fresh listing right before deleting. Training only commits ids newer than the
    # latest, so a planned deletion cannot become the latest through training; it can if someone
    # deleted the newer ones since (another prune, `baton ckpt rm`), and a pin or a live lease may
    # have appeared. Deleting only what both plans agree on catches all three, and a commit that
    # lands meanwhile can never widen the deletion. The cost is one more listing of this lineage.
    fresh = collect(store, lineage, leftovers=any(not d.committed for d in planned))
    # Never an earlier clock than the plan's: a caller may plan at a `now` of its choosing.
    now = max(retention_plan.now, utcnow())
    recheck = plan(retention_plan.policy, fresh.checkpoints, now, aliases=fresh.aliases,
                   leased=fresh.leased, uncommitted=fresh.uncommitted)
    verdicts = {(d.id, d.committed): d for d in recheck.decisions}
    done = []
    # Oldest first: a crash part-way leaves the newer, more useful checkpoints.
    for decision in sorted(planned, key=lambda d: d.id):
        verdict = verdicts.get((decision.id, decision.committed))
        if verdict is None:
            done.append(decision.model_copy(update={"bytes": 0, "reasons": [*decision.reasons, "already gone"]}))
        elif verdict.action == "keep":
            reasons = [f"re-checked before deleting: {r}" for r in verdict.reasons]
            done.append(decision.model_copy(update={"action": "keep", "reasons": reasons}))
        else:
            done.append(decision.model_copy(update={"bytes": _delete(store, decision, after_uncommit)}))
    return done


def _delete(store: CheckpointStore, decision: Decision, after_uncommit: Callable[[], None] | None) -> int:
    if decision.committed:
        freed = store.delete(decision.lineage, decision.id, after_uncommit)
    else:
        folder = store.path(decision.lineage, validate_checkpoint_id(decision.id))
        # A leftover that got its manifest since the re-check is a real checkpoint now: leave it.
        if store.fs.exists(f"{folder}/{MANIFEST_NAME}"):
            log.info("leftover %s/%s was committed meanwhile; keeping it", decision.lineage, decision.id)
            return 0
        freed = store._remove_folder(folder)
    log.info("deleted %s/%s (%d bytes): %s", decision.lineage, decision.id, freed, "; ".join(decision.reasons))
    return freed


def prune(store: CheckpointStore, policy: RetentionPolicy, lineage: str | None = None,
          dry_run: bool = False, now: datetime | None = None,
          after_uncommit: Callable[[], None] | None = None) -> RetentionPlan:
    """Collect, plan and (unless `dry_run`) apply `policy` to one lineage or the whole store."""
    inputs = collect(store, lineage)
    planned = plan(policy, inputs.checkpoints, now or utcnow(), aliases=inputs.aliases,
                   leased=inputs.leased, uncommitted=inputs.uncommitted)
    return planned if dry_run else apply(store, planned, after_uncommit)


# ---- small helpers -------------------------------------------------------------------------
def format_duration(value: timedelta) -> str:
    """A compact duration for humans: 90 s -> '1m30s', 7 days -> '7d'."""
    seconds, parts = int(value.total_seconds()), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _parse_id(ckpt_id: str) -> tuple[int | None, int | None]:
    try:
        epoch, step = validate_checkpoint_id(ckpt_id).split("-")
    except InvalidName:
        return None, None
    return int(epoch), int(step)
