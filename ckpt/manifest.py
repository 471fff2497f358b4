"""The manifest: the one small JSON document whose presence commits a checkpoint."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from .errors import ManifestUnreadable

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 4  # 4: files may be written by several ranks (FileEntry.rank); 3: BLAKE3 file hashes;
# 2 (chunked sha256) and 1 (whole-file sha256) still read
_HEX64 = r"^[0-9a-f]{64}$"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=0, description="Size of the file in bytes.")
    blake3: str | None = Field(default=None, pattern=_HEX64, description="Hex BLAKE3 of the file (schema 3).")
    sha256: str | None = Field(default=None, pattern=_HEX64,
                               description="Schemas 1-2: hex sha256 of the file or, with chunk_size, its chunked sha256.")
    chunk_size: int | None = Field(
        default=None, ge=2**16,
        description="Chunked sha256: `sha256` is the sha256 of the concatenated sha256 digests of "
                    "consecutive chunk_size-byte pieces (hashed in parallel). None: of the whole file.")
    rank: int | None = Field(default=None, ge=0,
                             description="Schema 4: the rank that wrote the file, in a checkpoint saved by "
                                         "several ranks (ckpt/sharded.py). None: written by one writer.")

    @model_validator(mode="after")
    def _one_hash(self) -> "FileEntry":
        if (self.blake3 is None) == (self.sha256 is None):
            raise ValueError("a file entry has exactly one of blake3 and sha256")
        if self.chunk_size is not None and self.sha256 is None:
            raise ValueError("chunk_size goes with a chunked sha256 only")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_hashes(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}

    @property
    def kind(self) -> str:
        """How `expected` was computed: "blake3", "chunked sha256" or "sha256"."""
        if self.blake3 is not None:
            return "blake3"
        return "sha256" if self.chunk_size is None else "chunked sha256"

    @property
    def expected(self) -> str:
        return self.blake3 or self.sha256  # type: ignore[return-value]


class Position(BaseModel):
    """Where training stands when the checkpoint is taken."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: int = Field(ge=0, description="The epoch in progress (or just finished).")
    batch_in_epoch: int = Field(ge=0, description="Batches of `epoch` already trained.")
    epoch_complete: bool = Field(description="True when `epoch` has been trained to its end.")
    step: int = Field(ge=0, description="Global optimizer steps taken since the lineage began.")

    @property
    def epochs_done(self) -> int:
        return self.epoch + 1 if self.epoch_complete else self.epoch


class Manifest(BaseModel):
    """Committed last; a checkpoint exists if and only if its manifest does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1, 2, 3, 4] = SCHEMA_VERSION
    lineage: str
    id: str
    position: Position
    created_at: datetime = Field(default_factory=utcnow)
    metrics: dict[str, float] = Field(default_factory=dict)
    config_hash: str = Field(default="", description="sha256 of the training config that produced it.")
    parent: str | None = Field(default=None, description="Id of the checkpoint training resumed from.")
    versions: dict[str, str] = Field(default_factory=dict, description="Library versions.")
    files: dict[str, FileEntry]
    digest: str = Field(description="Fingerprint of the model weights: the hash of their canonical safetensors "
                                    "file (names, dtypes, shapes, bytes), BLAKE3 since schema 3 (chunked sha256 "
                                    "in schema 2); equal iff the weights are. A sharded checkpoint's: the BLAKE3 of its "
                                    "data files' (rank, name, size, hash): ckpt.sharded.parts_digest.")
    fence: int = Field(default=0, ge=0, description="Lease fencing number of the writer.")

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def step(self) -> int:
        return self.position.step

    @property
    def epochs_done(self) -> int:
        return self.position.epochs_done

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


class CheckpointRef(BaseModel):
    """A small, serialisable pointer to a committed checkpoint (what tasks return)."""

    model_config = ConfigDict(frozen=True)

    lineage: str
    id: str
    uri: str
    epoch: int
    step: int
    epochs_done: int
    metrics: dict[str, float]
    digest: str
    created_at: datetime

    @classmethod
    def from_manifest(cls, manifest: Manifest, uri: str) -> "CheckpointRef":
        return cls(
            lineage=manifest.lineage,
            id=manifest.id,
            uri=uri,
            epoch=manifest.epoch,
            step=manifest.step,
            epochs_done=manifest.epochs_done,
            metrics=manifest.metrics,
            digest=manifest.digest,
            created_at=manifest.created_at,
        )


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def encode_manifest(manifest: Manifest) -> bytes:
    """The committed form: the manifest in an envelope carrying its own sha256."""
    body = manifest.model_dump(mode="json")
    envelope = {"manifest": body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}
    return json.dumps(envelope, sort_keys=True, indent=1).encode()


def decode_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and self-check a manifest; a flipped byte anywhere in it is a `ManifestUnreadable`
    naming `where`."""
    try:
        envelope = json.loads(raw)
        body = envelope["manifest"]
        intact = hashlib.sha256(_canonical(body)).hexdigest() == envelope["sha256"]
        manifest = Manifest.model_validate(body) if intact else None
    except (ValueError, KeyError, TypeError, ValidationError) as err:  # JSON, shape, schema
        raise ManifestUnreadable(where, f"{err.__class__.__name__}: {err}") from err
    if manifest is None:
        raise ManifestUnreadable(where, "its own sha256 does not match its content")
    return manifest
