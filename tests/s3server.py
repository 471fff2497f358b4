"""A real local S3 server (Ceph RADOS Gateway on 127.0.0.1) for tests.

``ensure_s3_server()`` runs ``scripts/s3-server start`` (idempotent: a server
already answering is reused) and returns the environment it prints;
``new_bucket(env, name)`` creates a bucket there and returns ``s3://name``.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "s3-server"


def ensure_s3_server(timeout: float = 600) -> dict[str, str]:
    """Start the local S3 server if needed; return its env (AWS_ENDPOINT_URL, keys, region...)."""
    try:
        proc = subprocess.run(
            [str(SCRIPT), "start"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{SCRIPT} start failed: {e!r}") from e
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export ") :].partition("=")
            env[key.strip()] = " ".join(shlex.split(value))
    if proc.returncode != 0 or "AWS_ENDPOINT_URL" not in env:
        raise RuntimeError(
            f"{SCRIPT} start failed (rc={proc.returncode})\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return env


def s3_client(env: dict[str, str]):
    """A botocore S3 client for the server described by ``env``."""
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


def new_bucket(env: dict[str, str], name: str) -> str:
    """Create bucket ``name`` (fine if it exists and is ours); return ``s3://name``."""
    client = s3_client(env)
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return f"s3://{name}"
