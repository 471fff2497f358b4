"""Validation of names that come from users: nothing may escape the store root."""

from __future__ import annotations

import re

from .errors import InvalidName

# Matched with fullmatch: `$` would also match before a final newline, letting 'nl\n' through.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CHECKPOINT_ID = re.compile(r"[0-9]{6}-[0-9]{10}")  # ASCII: \d would also take other scripts' digits


def validate_name(value: str, what: str = "lineage") -> str:
    """Return `value` if it is a safe single path segment, else raise `InvalidName`."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise InvalidName(
            f"invalid {what} name {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, with no '..', '/' or '\\' "
            f"(a {what} is one folder directly under the store root)"
        )
    return value


def validate_checkpoint_id(value: str) -> str:
    if not isinstance(value, str) or not _CHECKPOINT_ID.fullmatch(value):
        raise InvalidName(
            f"invalid checkpoint id {value!r}: ids look like 000003-0000000032 "
            "(epoch-step); list them with `baton ckpt ls STORE --lineage NAME`"
        )
    return value


def checkpoint_id(epoch: int, step: int) -> str:
    """Ids sort lexicographically in (epoch, step) order."""
    return f"{epoch:06d}-{step:010d}"
