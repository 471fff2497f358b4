"""The retention policy: what cleanup keeps, as a validated configuration model."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from .store import Mode

_SHORT_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIMEDELTA = TypeAdapter(timedelta)


class RetentionPolicy(BaseModel):
    """What to keep. A checkpoint survives if ANY rule keeps it.

    Always kept, whatever the policy: the newest checkpoint of each lineage whose files verify
    (the newest one at all when none does), every pinned (aliased) checkpoint, and the newest two
    of a lineage whose lease holder is alive. A checkpoint whose files fail verification counts
    toward no keep_* rule: it gives its place to the next good one.
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



def format_duration(value: timedelta | float) -> str:
    """A compact duration for humans, Baton's one formatter (retention reasons, the terminal):
    90 s -> '1m30s', 7 days -> '7d', 48.23 s -> '48.2s'. Under a minute a fraction is kept to a
    tenth of a second; from a minute on, whole seconds. Negative values count as 0."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    seconds = max(0.0, seconds)
    if seconds < 59.95 and round(seconds, 1) != round(seconds):
        return f"{seconds:.1f}s"
    whole, parts = round(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"
