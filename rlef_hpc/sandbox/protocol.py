"""The messages between the executor and its sandbox servers, and their framing.

Each message is a TypedDict defined here once and built by keyword on the sending side
(`RunRequest(type=RUN, job=..., ...)`); `read_message` rejects one whose type is unknown to the
reader or whose keys are not exactly its definition's, so a key renamed on one side fails loudly
at the first message rather than as a KeyError deep in a job.

On the wire: a length, then a marshal'd dict. marshal is the fastest serialiser for plain dicts
of str/bytes/numbers and both ends are the same interpreter; the channel is a private pipe, never
exposed to solutions.
"""

# No `from __future__ import annotations`: TypedDict needs NotRequired evaluated to tell the
# optional keys from the required ones.

import marshal
import os
import struct
from collections.abc import Mapping
from typing import Any, Final, Literal, NotRequired, TypedDict

_HEADER = struct.Struct("<Q")

# Message types (the "type" key). Executor -> server:
RUN: Final = "run"
STOP: Final = "stop"
EXIT: Final = "exit"
# Server -> executor:
HELLO: Final = "hello"
RESULT: Final = "result"
DONE: Final = "done"
ERROR: Final = "error"  # this job failed; the server keeps serving
FATAL: Final = "fatal"  # the sandbox itself failed; the server exits


class ServerConfig(TypedDict):
    """The server's command-line argument (JSON): who it is, where it works, and the host paths
    its trees are built from (see isolation.py)."""

    cache_dir: str  # C++ binaries, shared by all servers
    scratch: str  # this server's own directory: the mount point of its tree
    scratch_mb: int
    tmp_mb: int  # a test's /tmp
    tmp_inodes: int
    uid: int  # the unprivileged uid/gid its tests run as (when started as root)
    gid: int
    cpu: int  # the CPU this server and its tests are pinned to (-1: none)
    seccomp: bool
    python_paths: list[str]  # the interpreter's standard library (and lib-dynload)
    lib_paths: list[str]  # shared libraries the interpreter and its extension modules load
    masks: list[str]  # Python package directories: hidden wherever they fall in a tree
    package_dir: str  # rlef_hpc/sandbox: the server's own code


class Capabilities(TypedDict):
    """The isolation a server achieved (`Executor.capabilities`, `sandbox.capabilities()`)."""

    user_ns: bool  # not root: the worker's namespaces hang off a user namespace
    pid_ns: bool
    net_ns: bool
    ipc_ns: bool
    mount_ns: bool
    uts_ns: bool
    cgroup_ns: bool
    proc_private: bool  # the worker's /proc shows its own PID namespace only (tests: no /proc)
    minimal_root: bool  # the worker pivoted onto its tree; tests chroot into theirs
    landlock: bool  # tests and the compiler may touch files beneath their root only
    landlock_scoped: bool  # and signal nothing outside their Landlock domain (ABI 6+)
    seccomp: bool
    uid_drop: bool  # root: tests run as the worker's own unprivileged uid
    unmapped_uid: bool  # not root: tests run as an unmapped uid in a user namespace of their own
    no_tty: bool  # no process of the sandbox has a controlling terminal
    cpu_pinned: bool  # each worker (its tests, its compiler) on one CPU of its own
    rlimits: bool
    isolation_error: NotRequired[str]  # why isolation failed, when it did
    kernel: NotRequired[dict[str, Any]]  # what this kernel offers (added by the executor)


class RunRequest(TypedDict):
    """Run a solution on some of a job's inputs. Never the expected outputs (see runner)."""

    type: Literal["run"]
    job: int  # the executor's sequence number of this request
    language: str
    source: str
    inputs: list[bytes]
    first_index: int  # the job's index of inputs[0]
    limits: dict[str, Any]  # the fields of types.Limits
    stop_on_first_failure: bool
    allow_subprocesses: bool


class StopRequest(TypedDict):
    """Run no more of request `job`'s inputs (a stop-on-first-failure job failed)."""

    type: Literal["stop"]
    job: int


class ExitRequest(TypedDict):
    type: Literal["exit"]


class Hello(TypedDict):
    """The server is isolated and ready."""

    type: Literal["hello"]
    capabilities: Capabilities


class Report(TypedDict):
    """What one test did; the executor compares the output and makes the final verdict."""

    type: Literal["result"]
    index: int  # in the job
    verdict: str  # a types.Verdict value; OK means it exited cleanly
    time_s: float  # CPU
    wall_s: float
    memory_kb: int
    exit_code: int
    stdout: bytes
    stderr: str  # the tail


class Done(TypedDict):
    """The request's inputs have all run (or the job stopped)."""

    type: Literal["done"]


class Failure(TypedDict):
    type: Literal["error", "fatal"]
    message: str


ToServer = RunRequest | StopRequest | ExitRequest
ToExecutor = Hello | Report | Done | Failure

# What each end accepts, by type: the executor reads HELLO first, and only then the others.
TO_SERVER: Final[Mapping[str, type]] = {RUN: RunRequest, STOP: StopRequest, EXIT: ExitRequest}
STARTUP: Final[Mapping[str, type]] = {HELLO: Hello}
TO_EXECUTOR: Final[Mapping[str, type]] = {
    RESULT: Report,
    DONE: Done,
    ERROR: Failure,
    FATAL: Failure,
}


class ProtocolError(ValueError):
    """A message that is not one the reader accepts: a bug on the other side, never a verdict."""


def check_keys(value: Any, kind: type) -> None:
    """Raises ProtocolError unless `value` is a dict with exactly the keys of TypedDict `kind`."""
    if not isinstance(value, dict):
        raise ProtocolError(f"expected a {kind.__name__}, got {value!r:.200}")
    keys = value.keys()
    missing = kind.__required_keys__ - keys  # type: ignore[attr-defined]
    unknown = keys - kind.__required_keys__ - kind.__optional_keys__  # type: ignore[attr-defined]
    if missing or unknown:
        raise ProtocolError(
            f"malformed {kind.__name__}: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )


def check_message(message: Any, accepted: Mapping[str, type]) -> None:
    """Raises ProtocolError unless `message` is of a type in `accepted` and has exactly the
    keys of that type's definition."""
    kind = accepted.get(message.get("type")) if isinstance(message, dict) else None
    if kind is None:
        raise ProtocolError(f"unexpected message {message!r:.200}")
    check_keys(message, kind)


def write_frame(fd: int, message: Mapping[str, Any]) -> None:
    payload = marshal.dumps(message)
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data) :]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict[str, Any] | None:
    """The next frame, unchecked, or None when the other end has gone."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    payload = _read_exact(fd, _HEADER.unpack(header)[0])
    return None if payload is None else marshal.loads(payload)


def read_message(fd: int, accepted: Mapping[str, type]) -> Any:
    """The next message, checked against `accepted` (TO_SERVER, STARTUP or TO_EXECUTOR), or
    None when the other end has gone."""
    message = read_frame(fd)
    if message is not None:
        check_message(message, accepted)
    return message
