"""Helper processes that end with the process that started them, however it ended.

A trainer's helpers (the checkpoint writers and the Manager they report through) ignore or
defer the stop signals, which must only make the trainer checkpoint; so when the trainer is
SIGKILLed (or OOM-killed) nobody would ever stop them. A helper calls `die_with_parent` first
thing, with the `parent_token()` its parent took when it started it:

- Linux's parent-death signal (prctl PR_SET_PDEATHSIG, SIGKILL): immediate, but it fires when
  the *thread* that started the helper ends, so it is armed only for helpers started by the
  parent's main thread (which lives as long as the process);
- a watchdog thread that polls the helper's parent pid (re-parented once the parent is gone),
  for any other thread, for other systems, and for a parent that died before the prctl.

A helper's own forks are its helpers in turn (megatron's checkpoint writer forks its write
workers, which block forever once their reader is gone): each fork of an armed process is armed
on the process it was forked from. The watchdog also kills the helper's descendants before the
helper itself, for those started otherwise.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

# linux/prctl.h
_PR_SET_PDEATHSIG = 1
# How often the watchdog looks at the parent pid: the bound on how long a helper outlives a
# parent when the parent-death signal did not apply.
WATCHDOG_POLL_S = 0.2

_armed_for: int | None = None  # the parent this process already watches (idempotence)
_forking: tuple[int, bool] | None = None  # parent_token() of a fork in progress, for its child


def parent_token() -> tuple[int, bool]:
    """What a helper started now from this thread needs to know about its parent: this
    process's pid, and whether the starting thread is the main one (see the module doc)."""
    return os.getpid(), threading.current_thread() is threading.main_thread()


def die_with_parent(parent_pid: int, from_main_thread: bool) -> None:
    """Ends this process (SIGKILL, with its descendants) when process `parent_pid` stops being
    its parent, and so will each process forked from this one when this one ends. Call it in
    the child, before anything else; calling it again does nothing."""
    global _armed_for
    if _armed_for == parent_pid:
        return
    if _armed_for is None:  # a fork of an armed process inherits the hooks
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _armed_for = parent_pid
    if from_main_thread and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:  # gone already: before the prctl, or in a fork's race
        _end()
    threading.Thread(target=_watch, args=(parent_pid,), name="die-with-parent", daemon=True).start()


def _before_fork() -> None:
    global _forking
    _forking = parent_token()  # in the forking thread, which the child cannot tell


def _after_fork_in_child() -> None:
    assert _forking is not None
    die_with_parent(*_forking)


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCHDOG_POLL_S)
    _end()


def _end() -> None:
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc (empty where there is none to read)."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found
