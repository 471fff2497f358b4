"""Baton's checkpoint library: a store over fsspec with an atomic commit protocol, verification,
lineage queries, a single-writer lease, and the training state format. No Prefect, no Ray."""

from . import faults
from .errors import (
    CheckpointCorrupted,
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    CheckpointUndecodable,
    InjectedFault,
    InvalidArgument,
    InvalidFault,
    InvalidName,
    LeaseHeld,
    LeaseLost,
    LeaseUnreadable,
    ManifestUnreadable,
    StoreUnreachable,
    UnreadableFile,
)
from .lease import Lease, LeaseRecord
from .manifest import CheckpointRef, FileEntry, Manifest, Position
from .names import checkpoint_id, validate_name
from .sharded import IncompletePart, Part
from .retention import Decision, RetentionPlan, RetentionPolicy, apply, collect, plan, prune
from .state import RankRNG, TrainingState, capture_rng, decode, encode, model_digest, restore_rng
from .store import CheckpointStore

__all__ = [
    "CheckpointCorrupted", "CheckpointError", "CheckpointExists", "CheckpointNotFound",
    "CheckpointRef", "CheckpointStore", "CheckpointUndecodable", "Decision", "FileEntry", "IncompletePart", "InjectedFault",
    "InvalidArgument",
    "InvalidFault", "InvalidName", "Lease", "LeaseHeld", "LeaseLost", "LeaseRecord", "LeaseUnreadable",
    "Manifest", "ManifestUnreadable", "Part", "Position", "RankRNG",
    "RetentionPlan", "RetentionPolicy", "StoreUnreachable", "UnreadableFile", "apply", "collect", "faults", "plan", "prune",
    "TrainingState", "capture_rng", "checkpoint_id", "decode", "encode", "model_digest",
    "restore_rng", "validate_name",
]
