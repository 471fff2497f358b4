"""Every private Prefect API Baton uses is still there in the pinned Prefect and prefect-ray: a
failure here names what an upgrade moved (flows/_prefect_internals.py)."""

from __future__ import annotations

import sys

from flows import _prefect_internals


def test_the_pinned_prefect_has_every_private_api_baton_uses():
    assert _prefect_internals.check() == []


def test_the_control_intent_is_none_outside_a_runner_and_read_without_importing_prefect(monkeypatch):
    monkeypatch.delitem(sys.modules, _prefect_internals.CONTROL_LISTENER, raising=False)
    assert _prefect_internals.control_intent() is None
    assert _prefect_internals.CONTROL_LISTENER not in sys.modules  # a signal handler must not import Prefect
    import importlib

    importlib.import_module(_prefect_internals.CONTROL_LISTENER)
    assert _prefect_internals.control_intent() is None  # no runner acknowledged an intent


def test_the_check_fails_naming_a_server_flag_create_app_no_longer_reads(monkeypatch):
    monkeypatch.setattr(_prefect_internals, "_SERVER_FLAGS", ("PREFECT__SERVER_EPHEMERAL", "PREFECT__NO_SUCH_FLAG"))
    assert _prefect_internals.check() == [
        "prefect.server.api.server:create_app no longer reads PREFECT__NO_SUCH_FLAG"]


def test_no_module_but_the_guarded_one_reaches_into_a_private_prefect_api():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    private = re.compile(r"prefect\._internal|PREFECT__SERVER_(EPHEMERAL|FINAL)|server\.api\.server|drain_all|"
                         r"\.init_kwargs\s*=")
    offenders = [f"{path.relative_to(root)}:{number}: {line.strip()}"
                 for path in [*root.glob("flows/*.py"), *root.glob("deployments/*.py"), *root.glob("tasks/**/*.py")]
                 if path.name != "_prefect_internals.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert offenders == []
