"""The executor: a pool of sandbox workers fed from one queue of (job, tests) chunks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import hashlib
import itertools
import json
import logging
import os
import queue
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

from rlef_hpc.progress import progress_bar
from rlef_hpc.sandbox.compare import as_bytes, outputs_match
from rlef_hpc.sandbox.kernel import kernel_facts
from rlef_hpc.sandbox.protocol import (
    DONE,
    ERROR,
    EXIT,
    FATAL,
    RUN,
    STARTUP,
    STOP,
    TO_EXECUTOR,
    Capabilities,
    ExitRequest,
    Hello,
    ProtocolError,
    Report,
    RunRequest,
    ServerConfig,
    StopRequest,
    ToExecutor,
    ToServer,
    read_message,
    write_frame,
)
from rlef_hpc.sandbox.types import Job, Limits, TestCase, TestResult, Verdict

__all__ = [
    "REQUIRED",
    "Executor",
    "SandboxError",
    "SandboxUnavailableError",
    "capabilities",
    "default_cache_dir",
]

log = logging.getLogger(__name__)

# The isolations an executor refuses to run without, each named as `allow_missing` takes it,
# and what it needs of the workers' capabilities.
REQUIRED: dict[str, tuple[str, ...]] = {
    "seccomp": ("seccomp",),
    "namespaces": ("pid_ns", "mount_ns", "net_ns", "ipc_ns", "uts_ns"),
    "minimal_root": ("minimal_root",),
    "landlock": ("landlock",),
    "unprivileged": ("uid_drop", "unmapped_uid"),  # either
    "cpu_pinned": ("cpu_pinned",),
}
ALLOW_MISSING_ENV = "RLEF_SANDBOX_ALLOW_MISSING"

# Each executor's workers get uids of their own: RLIMIT_NPROC counts per uid, and a test can
# signal nothing that runs under another uid.
_UID_BASE = 1_000_000
_UIDS_PER_EXECUTOR = 64
_executor_ids = itertools.count()
# A fixed mmap threshold: glibc otherwise raises it after large frees and keeps big inputs in
# the worker's heap for good, and every page the worker holds makes each test's fork slower.
_WORKER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "MALLOC_MMAP_THRESHOLD_": "131072"}
# The server runs this package's own code (`python -m rlef_hpc.sandbox.server`, with the
# directory this package was imported from on its path): -I ignores PYTHONPATH, and without
# it a checkout's executor would start the server of whatever rlef_hpc is installed. Appended,
# so that it shadows nothing of the standard library's or site-packages'.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_SERVER_MAIN = (
    "import runpy, sys; sys.path.append(sys.argv.pop(1)); "
    "runpy.run_module('rlef_hpc.sandbox.server', run_name='__main__', alter_sys=True)"
)


class SandboxUnavailableError(RuntimeError):
    """The machine cannot give the isolation the caller asked for."""


class SandboxError(RuntimeError):
    """The executor could not run a job (not a verdict about the solution)."""


class ServerDied(Exception):
    """The worker's process ended (killed, out of memory): perhaps the test's doing."""


class WorkerFailed(Exception):
    """The worker could not run the job (it reported a failure of the sandbox, or sent what
    the executor cannot read): never the solution's verdict."""


def missing_isolation(caps: Mapping[str, Any]) -> list[str]:
    """The names in REQUIRED that `caps` lacks."""
    missing = []
    for name, keys in REQUIRED.items():
        ok = (
            any(caps.get(k) for k in keys)
            if name == "unprivileged"
            else all(caps.get(k) for k in keys)
        )
        if not ok:
            missing.append(name)
    return missing


@lru_cache(maxsize=8)
def host_paths(cache_dir: str) -> tuple[list[str], list[str], list[str]]:
    """What the sandbox's trees are built from (isolation.py): the interpreter's standard
    library (and lib-dynload), the shared libraries the interpreter and its extension modules
    load, and the Python package directories to hide wherever they fall inside a tree."""
    stdlib = sysconfig.get_paths()["stdlib"]
    python = [stdlib] + [
        p for p in sys.path if p.endswith("lib-dynload") and not p.startswith(stdlib + "/")
    ]
    dynload = [p for p in sys.path if p.endswith("lib-dynload")] or [
        os.path.join(stdlib, "lib-dynload")
    ]
    objects = [os.path.realpath(sys.executable)]
    for d in dynload:
        objects += sorted(glob.glob(os.path.join(d, "*.so")))
    packages = {*sys.path, *site.getsitepackages(), site.getusersitepackages()}
    packages.update(glob.glob("/usr/lib/python3*/*-packages"))
    packages.update(glob.glob("/usr/local/lib/python3*/*-packages"))
    masks = {
        os.path.realpath(p) for p in packages if p.endswith(("site-packages", "dist-packages"))
    }
    masks.add(str(Path(__file__).resolve().parents[1]))  # rlef_hpc: its data, its problems
    return python, _shared_libraries(objects, Path(cache_dir)), sorted(masks)


def _shared_libraries(objects: list[str], cache_dir: Path) -> list[str]:
    """The shared libraries `objects` load, by ldd (none if it is missing: then a test can use
    only what the interpreter has loaded already). ldd runs the loader once per object (2 s for
    an interpreter's extension modules), so the answer is kept in the cache, keyed by the
    objects' and the loader cache's identity."""
    stamp = []
    for path in [*objects, "/etc/ld.so.cache"]:
        try:
            st = os.stat(path)
            stamp.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            stamp.append((path, 0, 0, 0))
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    kept = cache_dir / f"shared-libraries-{key}.json"
    try:
        return json.loads(kept.read_text())
    except (OSError, ValueError):
        pass
    try:
        out = subprocess.run(
            ["ldd", *objects], capture_output=True, text=True, timeout=300, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    libs = sorted({m[1] for m in re.finditer(r"(/\S+) \(0x[0-9a-f]+\)", out)})
    try:
        tmp = kept.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(libs))
        tmp.rename(kept)
    except OSError:
        pass
    return libs


def default_cache_dir() -> Path:
    root = os.environ.get("RLEF_HPC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rlef_hpc"
    )
    return Path(root) / "sandbox"


@lru_cache(maxsize=256)
def _limits_message(limits: Limits) -> dict[str, Any]:
    return asdict(limits)  # asdict is slow, and most jobs share a handful of Limits


class _JobState:
    def __init__(self, job: Job, future: concurrent.futures.Future[list[TestResult]], parts: int):
        self.job = job
        self.future = future
        self.results: list[TestResult | None] = [None] * len(job.tests)
        self.parts_left = parts
        self.lock = threading.Lock()

    def part_done(self) -> None:
        with self.lock:
            self.parts_left -= 1
            if self.parts_left:
                return
        if self.job.stop_on_first_failure:  # the tests after the first failure never ran
            ran = list(itertools.takewhile(lambda r: r is not None, self.results))
        else:
            ran = self.results
        self.future.set_result(ran)  # type: ignore[arg-type]


class _Server:
    """One sandbox server process (rlef_hpc.sandbox.server): a worker, from the executor's side."""

    def __init__(self, config: ServerConfig, log_path: str) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            # A session of its own: no process of the sandbox has the caller's terminal.
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _SERVER_MAIN, _PACKAGE_ROOT, json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                close_fds=True,
                cwd="/",
                env=_WORKER_ENV,
                start_new_session=True,
            )
        self.rfd, self.wfd = self.proc.stdout.fileno(), self.proc.stdin.fileno()  # type: ignore[union-attr]
        try:
            hello: Hello | None = read_message(self.rfd, STARTUP)
        except ProtocolError as e:
            raise SandboxUnavailableError(f"sandbox worker failed to start: {e}") from None
        if hello is None:
            raise SandboxUnavailableError(f"sandbox worker failed to start:\n{self.log_tail()}")
        self.capabilities: Capabilities = hello["capabilities"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def send(self, message: ToServer) -> None:
        try:
            write_frame(self.wfd, message)
        except OSError as e:
            raise ServerDied(str(e)) from None

    def receive(self) -> ToExecutor:
        try:
            message = read_message(self.rfd, TO_EXECUTOR)
        except (ProtocolError, ValueError, EOFError, TypeError) as e:  # marshal's too
            raise WorkerFailed(f"sandbox worker sent a malformed message: {e}") from None
        if message is None:
            raise ServerDied(f"exit status {self.proc.wait()}")
        if message["type"] in (FATAL, ERROR):
            raise WorkerFailed(f"sandbox worker failed on this job:\n{message['message']}")
        return message

    def close(self, kill: bool = False) -> None:
        """Ends the worker: asked to exit, or (`kill`: its channel can no longer be trusted)
        killed at once."""
        if kill:
            self.proc.kill()
        else:
            try:
                write_frame(self.wfd, ExitRequest(type=EXIT))
            except OSError:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Executor:
    """Runs untrusted solutions on tests, isolated, on `workers` long-lived worker processes.

    Each worker enters fresh namespaces once, pivots onto a tree of its own, and runs each test
    in a fork of its template (Python) or an exec (C++), chrooted into the test's tree, without
    capabilities as an unprivileged uid, with rlimits, Landlock and seccomp (isolation.py,
    csrc/executor.cc). Where the machine cannot give one of the isolations in REQUIRED it
    refuses to start, naming it, unless the caller names it in `allow_missing` (or passes
    `unsafe=True`: anything may be missing); a caller that passes none takes the names from
    $RLEF_SANDBOX_ALLOW_MISSING (comma-separated). `allow_subprocesses` lets tests fork (bounded by
    `Limits.processes`); by default creating a process is a SANDBOX_VIOLATION.

        with Executor(workers=2) as ex:
            results = ex.run("python", source, [{"input": "1 2\\n", "output": "3\\n"}])

    A test the sandbox could not run (its worker failed twice) is a SANDBOX_ERROR result,
    never an exception: `sandbox_errors` counts them, and the worker is replaced each time.
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        unsafe: bool = False,
        seccomp: bool = True,
        allow_missing: Iterable[str] | None = None,
        allow_subprocesses: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        keep_bytes: int = 4096,
        scratch_mb: int = 256,
        tmp_mb: int = 64,
        tmp_inodes: int = 4096,
    ) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        if allow_missing is None:  # the operator's opt-out, for callers that pass none
            allow_missing = filter(None, os.environ.get(ALLOW_MISSING_ENV, "").split(","))
        allowed = set(allow_missing)
        if unknown := allowed - REQUIRED.keys():
            raise ValueError(
                f"allow_missing: unknown {sorted(unknown)}; expected some of {', '.join(REQUIRED)}"
            )
        self.workers = workers
        self.unsafe = unsafe
        self.keep_bytes = keep_bytes
        self._jobs = itertools.count()
        self.allow_subprocesses = allow_subprocesses
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # 0700: the workers' logs (and, without isolation, their scratch) are nobody else's.
        self._root = tempfile.mkdtemp(prefix="rlef-sandbox-")
        slot = (os.getpid() * 7919 + next(_executor_ids)) % 100_000
        self.uids = [_UID_BASE + slot * _UIDS_PER_EXECUTOR + i for i in range(workers)]
        self._cache_dir = str(self.cache_dir)
        self._scratch_mb = scratch_mb
        self._tmp_mb = tmp_mb
        self._tmp_inodes = tmp_inodes
        self._seccomp = seccomp
        self._starts = itertools.count()
        cpus = sorted(os.sched_getaffinity(0))
        self._cpus = [cpus[i % len(cpus)] for i in range(workers)]
        self.sandbox_errors = 0  # tests reported SANDBOX_ERROR
        self.worker_restarts = 0
        self._queue: queue.SimpleQueue[tuple[_JobState, list[int]] | None] = queue.SimpleQueue()
        self._procs: list[_Server | None] = [None] * workers
        # Held while a thread talks to worker i: its serving thread, or a caller running inline.
        self._slots = [threading.Lock() for _ in range(workers)]
        self._closed = False
        # Start every worker now, in parallel: a machine that cannot sandbox fails here, at
        # construction, not in the middle of a training step.
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            starts = [pool.submit(self._start, i) for i in range(workers)]
        try:
            started = [f.result() for f in starts]
        except BaseException:
            self._shutdown_workers()  # those that did start; and nothing left on disk
            shutil.rmtree(self._root, ignore_errors=True)
            raise
        self.capabilities: Capabilities = {**started[0].capabilities, "kernel": kernel_facts()}
        missing = missing_isolation(self.capabilities)
        refused = [] if unsafe else [m for m in missing if m not in allowed]
        if refused:
            self._shutdown_workers()
            shutil.rmtree(self._root, ignore_errors=True)
            why = self.capabilities.get("isolation_error", "not available on this machine")
            raise SandboxUnavailableError(
                f"refusing to run untrusted code: the sandbox lacks {', '.join(refused)} "
                f"({why}). Pass allow_missing={refused!r} (CLI: --allow-missing "
                f"{','.join(refused)}; environment: {ALLOW_MISSING_ENV}={','.join(refused)}) "
                "to run without it, or unsafe=True (--unsafe)."
            )
        self._threads = [
            threading.Thread(target=self._serve, args=(i,), name=f"sandbox-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._root, True)

    # --- public API ------------------------------------------------------------------------------

    def run(
        self,
        language: str,
        source: str,
        tests: Iterable[TestCase | Mapping[str, Any] | Sequence[Any]],
        limits: Limits | None = None,
        stop_on_first_failure: bool = False,
        compare: str = "tokens",
    ) -> list[TestResult]:
        """Runs `source` on every test (or up to the first failure) and returns one result each."""
        job = Job.build(language, source, tests, limits, stop_on_first_failure, compare)
        inline = self._run_inline(job)
        return inline if inline is not None else self.submit(job).result()

    def submit(self, job: Job) -> concurrent.futures.Future[list[TestResult]]:
        if self._closed:
            raise RuntimeError("executor is closed")
        if not isinstance(job, Job):
            raise TypeError(f"submit() takes a Job, got {type(job).__name__}")
        future: concurrent.futures.Future[list[TestResult]] = concurrent.futures.Future()
        n = len(job.tests)
        if n == 0:
            future.set_result([])
            return future
        # Independent tests spread over all workers; a stop-on-failure job runs in order on one.
        size = n if job.stop_on_first_failure else -(-n // self.workers)
        chunks = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        state = _JobState(job, future, len(chunks))
        for chunk in chunks:
            self._queue.put((state, chunk))
        return future

    def run_many(self, jobs: Iterable[Job], progress: bool = False) -> list[list[TestResult]]:
        """Runs many jobs with every worker kept busy; results in the order of `jobs`."""
        futures = [self.submit(job) for job in jobs]
        if progress:
            with progress_bar(total=len(futures), desc="sandbox", unit="job") as bar:
                for _ in concurrent.futures.as_completed(futures):
                    bar.update()
        return [f.result() for f in futures]

    async def run_async(
        self, language: str, source: str, tests: Iterable[Any], **kwargs: Any
    ) -> list[TestResult]:
        """`run` for asyncio code: awaits without blocking the event loop."""
        job = Job.build(language, source, tests, **kwargs)
        return await asyncio.wrap_future(self.submit(job))

    def worker_pids(self) -> list[int]:
        """Pids of the worker processes (as seen from here), e.g. to watch or kill them."""
        return [w.pid for w in self._procs if w is not None]

    def leftover_processes(self) -> list[str]:
        """Processes in the workers' namespaces other than the workers and their prepared
        (not yet started) test processes: whatever a test left behind. Always empty, unless
        something escaped the cleanup; read from /proc, so it works whatever the uids."""
        namespaces = set()
        for launcher in self.worker_pids():
            try:
                children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
                namespaces.update(os.readlink(f"/proc/{c}/ns/pid") for c in children)
            except OSError:
                continue  # a worker being restarted
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if os.readlink(proc / "ns/pid") not in namespaces:
                    continue
                status = dict(
                    line.split(":\t", 1) for line in (proc / "status").read_text().splitlines()
                )
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to look at
            ours = status["Name"] in ("rlef-spare", "rlef-template")
            if status["NSpid"].split()[-1] != "1" and not ours:
                found.append(f"pid {proc.name} ({status['Name']}, {status['State']})")
        return found

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._shutdown_workers()
        self._finalizer()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- workers ---------------------------------------------------------------------------------

    def _start(self, i: int) -> _Server:
        # A directory of its own for every start: a replaced worker's leftovers (there are none
        # with a minimal root: its tmpfs lived in its own mount namespace) reach nobody.
        scratch = os.path.join(self._root, f"w{i}.{next(self._starts)}")
        os.makedirs(scratch)
        python, libs, masks = host_paths(self._cache_dir)
        config = ServerConfig(
            cache_dir=self._cache_dir,
            scratch=scratch,
            scratch_mb=self._scratch_mb,
            tmp_mb=self._tmp_mb,
            tmp_inodes=self._tmp_inodes,
            uid=self.uids[i],
            gid=self.uids[i],
            cpu=self._cpus[i],
            seccomp=self._seccomp,
            python_paths=python,
            lib_paths=libs,
            masks=masks,
            package_dir=str(Path(__file__).resolve().parent),
        )
        worker = _Server(config, os.path.join(self._root, f"w{i}.log"))
        self._procs[i] = worker
        return worker

    def _shutdown_workers(self) -> None:
        for i, w in enumerate(self._procs):
            if w is not None:
                w.close()
                self._procs[i] = None

    def _serve(self, i: int) -> None:
        while (item := self._queue.get()) is not None:
            with self._slots[i]:
                self._run_part(i, *item)

    def _run_part(self, i: int, state: _JobState, chunk: list[int]) -> None:
        try:
            self._run_chunk(i, state, chunk)
        except BaseException as e:  # noqa: BLE001 - never leave a caller waiting forever
            if not state.future.done():
                state.future.set_exception(e)
            return
        state.part_done()

    def _run_inline(self, job: Job) -> list[TestResult] | None:
        """A job that would be one chunk anyway runs in the caller's thread when a worker is
        idle: two thread hand-offs less on the latency of a single test."""
        if not (len(job.tests) == 1 or job.stop_on_first_failure) or self._closed:
            return None
        for i, slot in enumerate(self._slots):
            if slot.acquire(blocking=False):
                try:
                    future: concurrent.futures.Future[list[TestResult]]
                    future = concurrent.futures.Future()
                    self._run_part(i, _JobState(job, future, 1), list(range(len(job.tests))))
                    return future.result()
                finally:
                    slot.release()
        return None

    def _replace(self, i: int, worker: _Server | None, kill: bool) -> str:
        """Drops worker i (a fresh one starts for the next request) and returns its log's
        tail."""
        self._procs[i] = None
        self.worker_restarts += 1
        if worker is None:
            return ""
        tail = worker.log_tail()
        worker.close(kill=kill)
        return tail

    def _run_chunk(self, i: int, state: _JobState, chunk: list[int]) -> None:
        job = state.job
        pending = list(chunk)
        deaths = failures = 0
        while pending:
            worker = None
            seq = next(self._jobs)
            stopped = False
            try:
                worker = self._procs[i] or self._start(i)
                # Inputs only: expected outputs never enter the worker (see runner.Runner.run_job).
                worker.send(
                    RunRequest(
                        type=RUN,
                        job=seq,
                        language=job.language,
                        source=job.source,
                        inputs=[as_bytes(job.tests[k].input) for k in pending],
                        first_index=pending[0],
                        limits=_limits_message(job.limits),
                        stop_on_first_failure=job.stop_on_first_failure,
                        allow_subprocesses=self.allow_subprocesses,
                    )
                )
                while (message := worker.receive())["type"] != DONE:
                    k = message["index"]
                    if k not in pending:
                        raise WorkerFailed(f"a result for test {k}, not one of this request's")
                    if stopped:  # ran before the worker saw the stop: not part of the answer
                        continue
                    state.results[k] = result = self._judge(job, k, message)
                    pending.remove(k)
                    if job.stop_on_first_failure and not result.passed:
                        stopped = True
                        worker.send(StopRequest(type=STOP, job=seq))
                if pending and not (stopped or job.stop_on_first_failure):
                    raise WorkerFailed(f"done without results for tests {pending}")
                return
            except ServerDied as e:
                # The test in flight is retried once on a fresh worker (the crash may not be
                # its doing); if the worker dies again it is reported, never silently dropped.
                log_tail = self._replace(i, worker, kill=False)
                deaths += 1
                if deaths >= 2:
                    message = f"sandbox worker died twice while running this test ({e})\n"
                    state.results[pending.pop(0)] = TestResult(
                        Verdict.SANDBOX_VIOLATION, 0.0, 0.0, 0, "", message + log_tail[-2000:], -1
                    )
                    deaths = 0
                    if job.stop_on_first_failure:
                        return
            except Exception as e:  # noqa: BLE001 - whatever went wrong, this worker is done
                # Its channel may hold unread reports (a later job would be judged with this
                # one's output): the worker is killed, never asked again. The tests are retried
                # once on a fresh worker, then reported as not run: never a verdict, never an
                # exception in the caller's training step.
                log_tail = self._replace(i, worker, kill=True)
                failures += 1
                log.warning("sandbox worker %d failed (%s); replaced", i, e)
                if failures >= 2:
                    message = f"the sandbox could not run this test: {e}\n{log_tail[-2000:]}"
                    for k in pending:
                        state.results[k] = TestResult(
                            Verdict.SANDBOX_ERROR, 0.0, 0.0, 0, "", message, -1
                        )
                    self.sandbox_errors += len(pending)
                    return

    def _judge(self, job: Job, k: int, message: Report) -> TestResult:
        """The worker's observation of test k, with the output compared here."""
        stdout: bytes = message["stdout"]
        verdict = Verdict(message["verdict"])
        expected = job.tests[k].output
        if verdict is Verdict.OK and expected is not None:
            if not outputs_match(expected, stdout, job.compare):
                verdict = Verdict.WRONG_ANSWER
        return TestResult(
            verdict=verdict,
            time_s=message["time_s"],
            wall_s=message["wall_s"],
            memory_kb=message["memory_kb"],
            output=stdout[: self.keep_bytes].decode(errors="replace"),
            stderr=message["stderr"],
            exit_code=message["exit_code"],
            output_truncated=len(stdout) > self.keep_bytes,
        )


def capabilities() -> dict[str, Any]:
    """The isolation a worker achieves on this machine (namespaces, minimal root, seccomp,
    unprivileged tests, ...), and under "kernel" what the kernel offers (cgroup controllers,
    Landlock ABI, user namespaces)."""
    with Executor(workers=1, unsafe=True) as ex:
        return dict(ex.capabilities)
