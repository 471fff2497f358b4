"""What a `baton` process started ends with it: the process tree is found through /proc, orphans
are adopted so that they are found too, and a child started to die with its parent does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from flows._process import die_with_parent_code

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A process that adopts orphans, starts a child that starts a grandchild and exits (the grandchild
# is orphaned), then kills its whole tree; it prints the grandchild's pid.
KILLS_ITS_TREE = """
import os, subprocess, sys, time
from flows._process import adopt_orphans, descendants, kill_descendants
assert adopt_orphans()
out = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
grandchild = int(out.stdout)
assert grandchild in descendants(), "an orphan of ours is still ours to find"
assert kill_descendants() >= 1
time.sleep(0.2)
print(grandchild, grandchild in descendants())
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_killing_the_tree_ends_a_grandchild_whose_parent_exited_first():
    out = subprocess.run([sys.executable, "-c", KILLS_ITS_TREE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    grandchild, still_ours = out.stdout.split()
    assert still_ours == "False" and not _alive(int(grandchild))


# A parent that starts `python -m http.server` the way the temporary Prefect server is started,
# prints the child's pid and its session, and waits to be killed.
PARENT = """
import os, subprocess, sys, time
from flows._process import die_with_parent_code
child = subprocess.Popen([sys.executable, "-c", die_with_parent_code(os.getpid(), "http.server"), "0",
                          "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
print(child.pid, os.getsid(child.pid), os.getsid(0), flush=True)
time.sleep(120)
"""


def test_a_child_started_to_die_with_its_parent_dies_when_the_parent_is_sigkilled():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        child, child_session, parent_session = map(int, parent.stdout.readline().split())
        assert child_session != parent_session  # a terminal's Ctrl-C or hang-up does not reach it
        time.sleep(0.5)
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its parent"
    finally:
        parent.kill()
        parent.wait(10)


def test_the_child_code_runs_the_module_with_its_arguments_and_exits_if_its_parent_is_already_gone():
    ran = subprocess.run([sys.executable, "-c", die_with_parent_code(os.getpid(), "json.tool"), "--compact"],
                         input='{"a": [1, 2]}', capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.strip() == '{"a":[1,2]}', ran.stderr
    orphan = subprocess.run([sys.executable, "-c", die_with_parent_code(1, "json.tool")], input="{}",
                            capture_output=True, text=True, timeout=60)
    assert orphan.returncode == 0 and orphan.stdout == ""  # its parent is not pid 1: it never ran
