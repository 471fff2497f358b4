"""What a `baton` process owns, and how it ends at once: every process it started (the temporary
Prefect server, a local Ray's GCS, raylet and workers, the warm worker group) and the terminal.

Standard library only: this is imported before anything heavy, so that a signal while torch is
being imported already has Baton's handler.
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: the sweep below still finds direct children
        return False


def adopt_orphans() -> bool:
    """Descendants whose parent dies (a raylet's workers, say) are re-parented to this process
    instead of to init, so that `kill_descendants` still finds them."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if fields[0] != b"Z":  # a zombie is already dead: its parent only has to reap it
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(root: int | None = None) -> set[int]:
    """Live processes whose parent chain leads to `root` (this process by default)."""
    children, found, todo = _children_by_parent(), set(), [root or os.getpid()]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_descendants(passes: int = 10) -> int:
    """SIGKILL every descendant, again until none is left: a process forked between one scan and
    its kill is an orphan of ours by the next scan (`adopt_orphans`). Returns how many."""
    killed: set[int] = set()
    for _ in range(passes):
        alive = descendants() - killed
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed |= alive
        time.sleep(0.02)
    return len(killed)


def stop_descendants(grace_s: float = 3.0) -> int:
    """At the end of a command: SIGTERM what is still running of what it started, SIGKILL what is
    left after `grace_s`. Returns how many were still running."""
    left = descendants()
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while descendants() and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_descendants()
    return len(left)


class Terminal:
    """The terminal this process started on, kept apart from fds 1 and 2 (which `baton train`
    sends to its log file), so that a last line reaches the person who pressed Ctrl-C."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.device: int | None = None
        try:
            if os.isatty(2):
                self.device = os.fstat(2).st_rdev
            self.fd = os.dup(2)
        except OSError:
            pass

    def is_stderr(self) -> bool:
        """fd 2 still leads where it led at the start (nothing sent it to a log file)."""
        try:
            return self.fd is not None and os.path.samestat(os.fstat(2), os.fstat(self.fd))
        except OSError:
            return False

    def say(self, line: str) -> None:
        """One line, after clearing a live progress line and showing the cursor rich hid."""
        if self.fd is None:
            return
        prefix = "\r\x1b[2K\x1b[?25h" if self.device is not None else ""
        try:
            os.write(self.fd, (prefix + line + "\n").encode("utf-8", "replace"))
        except OSError:  # the terminal is gone (SIGHUP): nobody to tell
            pass

    def hung_up(self) -> None:
        """The terminal was closed: every fd of this process that leads to it leads to /dev/null
        instead, so that what is printed from now on (progress, the last lines) fails nowhere."""
        if self.device is None:
            return
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            for entry in os.listdir("/proc/self/fd"):
                fd = int(entry)
                try:
                    info = os.fstat(fd)
                except OSError:
                    continue
                if fd != null and stat.S_ISCHR(info.st_mode) and info.st_rdev == self.device:
                    os.dup2(null, fd)
        finally:
            os.close(null)


def die_with_parent_code(parent_pid: int, module: str) -> str:
    """Python code for `python -c CODE ARGS...` that runs `module` as `python -m module ARGS...`
    would, but is SIGKILLed when this process ends, however it ends (SIGKILL included): the
    kernel's parent-death signal. If this process is already gone when the child starts, the child
    exits at once. (The signal follows the thread that started the child: start it from the main
    thread.)"""
    return ("import ctypes, os, runpy, sys\n"
            f"ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, {int(signal.SIGKILL)}, 0, 0, 0)\n"
            f"if os.getppid() != {parent_pid}:\n"
            "    sys.exit(0)\n"
            f"sys.argv = [{module!r}, *sys.argv[1:]]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
