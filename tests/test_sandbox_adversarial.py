"""The sandbox against an attacker who has read its source (tests/adversarial/).

By class: reading the host, reading earlier tests, persisting, the terminal, privileges,
breaking the worker, fooling the judge, exhausting memory, CPU, disk, inodes and compile time;
in Python and C++; in both modes the executor has: as root, and as an unprivileged user (its
workers then hang off a user namespace). Each mode's executor runs in a process of its own
(tests/adversarial/remote.py) with a terminal as its controlling terminal, as an operator's
would be; for the unprivileged mode the test starts it as uid 54321 (unshare + setpriv, which
needs root: CI runs as root) in a private mount namespace where the interpreter (under /root
here) is reachable. Every case asserts the verdict, that the next job on the same worker is
judged right, and that the worker was not replaced (the attack did not break it).

About 3 min (most of it the two compile-time attacks and the memory scans).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import require

ADVERSARIAL = Path(__file__).parent / "adversarial"
REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "rlef_hpc" / "data" / "bundled" / "problems.jsonl"
USERNS_UID = 54321  # no passwd entry needed; not 65534, the uid an unmapped test sees
A_PLUS_B = "a, b = map(int, input().split())\nprint(a + b)\n"
CPP_A_PLUS_B = (
    '#include <cstdio>\nint main() { long long a, b; scanf("%lld %lld", &a, &b); '
    'printf("%lld\\n", a + b); }\n'
)
LIMITS = {"time_s": 2.0, "memory_mb": 256, "output_bytes": 1 << 20}
MODES = ("root", "userns")


def header(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"^(?:#|//) ([a-z-]+): (.*)$", line):
            fields[m[1]] = m[2]
    return fields


class Remote:
    """An executor in a process of its own, as root or as USERNS_UID (see the docstring)."""

    def __init__(self, mode: str, workers: int, tmp: Path) -> None:
        self.mode = mode
        self.tmp = tmp
        self.cache = tmp / f"cache-{mode}-{workers}"
        self.cache.mkdir()
        self.log = open(tmp / f"remote-{mode}-{workers}.log", "wb")  # noqa: SIM115
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)),
            "HOME": str(tmp),
            "LANG": "C.UTF-8",
        }
        argv = [sys.executable, str(ADVERSARIAL / "remote.py"), str(workers), str(self.cache)]
        if mode == "userns" and os.geteuid() == 0:
            os.chown(self.cache, USERNS_UID, USERNS_UID)
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _expose(), "-"]
            argv += ["setpriv", f"--reuid={USERNS_UID}", f"--regid={USERNS_UID}"]
            argv += ["--clear-groups", "env", "-i", *(f"{k}={v}" for k, v in env.items())]
            argv += [sys.executable, str(ADVERSARIAL / "remote.py"), str(workers), str(self.cache)]
        # The operator's terminal: the executor's controlling terminal, as it would be when a
        # trainer is started from a shell. Whatever a test pushes into it arrives here.
        self.master, slave = os.openpty()

        def take_terminal() -> None:
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            preexec_fn=take_terminal,  # noqa: PLW1509 - the one way to give it a terminal
        )
        os.close(slave)
        os.set_blocking(self.master, False)
        self.info = self.request({"op": "info"})

    def request(self, message: dict) -> dict:
        self.proc.stdin.write((json.dumps(message) + "\n").encode())  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            pytest.fail(f"the executor ({self.mode}) exited:\n{self.log_text()}")
        answer = json.loads(line)
        assert "error" not in answer, answer["error"]
        return answer

    def run(self, *jobs: dict) -> list[list[dict]]:
        return self.request({"op": "run", "jobs": list(jobs)})["results"]

    def worker_pids(self) -> list[int]:
        return self.request({"op": "info"})["worker_pids"]

    def typed_into_terminal(self) -> bytes:
        """What reached the terminal's input queue, as its reader would see it."""
        try:
            return os.read(self.master, 1 << 16)
        except OSError:
            return b""

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        self.log.close()


def _expose() -> str:
    """A shell script for a private mount namespace: where the interpreter lies under a
    directory the unprivileged user cannot enter (pyenv under /root), that directory becomes
    an empty tmpfs holding only the interpreter's installation; then exec "$@"."""
    prefix = os.path.realpath(sys.base_prefix)
    blocked = None
    for parent in [*reversed(Path(prefix).parents), Path(prefix)]:
        if str(parent) != "/" and not os.stat(parent).st_mode & 0o001:
            blocked = parent
            break
    if blocked is None:
        return 'exec "$@"'
    return (
        f"set -e; stash=$(mktemp -d); mount --bind {prefix} $stash; "
        f"mount -t tmpfs -o mode=0755,size=1m tmpfs {blocked}; mkdir -p {prefix}; "
        f'mount --move $stash {prefix}; rmdir $stash; exec "$@"'
    )


def _mode_available(mode: str) -> None:
    if mode == "root":
        require(os.geteuid() == 0, "the root mode needs root")
    else:
        unprivileged = os.geteuid() != 0 or bool(
            shutil.which("setpriv") and shutil.which("unshare")
        )
        require(unprivileged, "the unprivileged mode needs setpriv and unshare (util-linux)")


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Not under pytest's (0700) base: the unprivileged executor's cache lives here.
    tmp = Path(tempfile.mkdtemp(prefix="rlef-adversarial-"))
    tmp.chmod(0o755)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _remote(request: pytest.FixtureRequest, workdir: Path, workers: int) -> Iterator[Remote]:
    _mode_available(request.param)
    r = Remote(request.param, workers, workdir)
    yield r
    r.close()


@pytest.fixture(scope="module", params=MODES)
def remote(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Remote]:
    yield from _remote(request, workdir, 1)


@pytest.fixture(scope="module")
def probes(workdir: Path, remote: Remote) -> list[str]:
    """Paths a test must not reach: the project's data, a run's problems, the executor's logs
    and cache, a secret of the user running the executor, the host's /etc, /home, /root."""
    run = workdir / "run" / "problems"
    run.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUNDLED, run / "train.jsonl")
    secret = workdir / f"secret-{remote.mode}"
    secret.write_text("id_rsa: the user's own secret\n")
    secret.chmod(0o600)
    if remote.mode == "userns" and os.geteuid() == 0:
        os.chown(secret, USERNS_UID, USERNS_UID)
    root = remote.info["root"]
    return [
        str(BUNDLED),
        str(run / "train.jsonl"),
        str(run),
        str(secret),
        root,
        os.path.join(root, "w0.log"),
        str(remote.cache),
        str(REPO),
        "/etc/hostname",
        "/etc/hosts",
        "/etc/shadow",
        "/etc/os-release",
        "/home",
        "/work",
        "/root/.bashrc",
        "/root/.cache",
        "/root/.ssh",
        "/proc/1/environ",
        "/proc/1/cmdline",
        "/sys/kernel",
        "/var",
        "/opt",
        "/run",
        "/boot",
    ]


def program(name: str, **fills: object) -> tuple[str, str, dict[str, str]]:
    """(language, source with its @KEY@ placeholders filled in, header) of
    tests/adversarial/<name>."""
    path = ADVERSARIAL / name
    source = path.read_text()
    for key, value in fills.items():
        mark = f"@{key.upper()}@"
        if isinstance(value, str | Path):  # inside a string literal already
            source = source.replace(mark, str(value))
        else:  # a Python literal where the placeholder string stands
            source = source.replace(f'"{mark}"', repr(value))
    return ("python" if path.suffix == ".py" else "cpp"), source, header(path)


def job(language: str, source: str, tests: list[tuple[str, str | None]], **limits: float) -> dict:
    return {"language": language, "source": source, "tests": tests, "limits": {**LIMITS, **limits}}


def still_judging_right(remote: Remote, pids: list[int], language: str = "python") -> None:
    """The next jobs on the same worker: judged right, and by the same worker process."""
    checks = [job("python", A_PLUS_B, [("2 3\n", "5\n"), ("2 3\n", "6\n")])]
    if language == "cpp":
        checks.append(job("cpp", CPP_A_PLUS_B, [("40 2\n", "42\n"), ("1 1\n", "3\n")]))
    for results in remote.run(*checks):
        assert [r["verdict"] for r in results] == ["OK", "WRONG_ANSWER"], results
    assert remote.worker_pids() == pids, "the attack cost the worker its life"


def attack(
    remote: Remote,
    name: str,
    tests: list[tuple[str, str | None]] | None = None,
    fills: dict | None = None,
    **limits: float,
) -> dict:
    """Runs tests/adversarial/<name> with the verdict and output its header names; then
    checks the worker. Returns the result."""
    language, source, meta = program(name, **(fills or {}))
    if tests is None:
        expected = meta["output"] + "\n" if "output" in meta else None
        tests = [("1 2\n", expected)]
    pids = remote.worker_pids()
    [[result]] = remote.run(job(language, source, tests, **limits))
    assert result["verdict"] == meta["expect"], describe(result)
    still_judging_right(remote, pids, language)
    return result


def describe(result: dict | list) -> str:
    return json.dumps(result, indent=1)[:6000]


def cpp_probes(paths: list[str]) -> str:
    return ", ".join(json.dumps(p) for p in paths)


# --- reading the host ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["py_read_host.py", "cpp_read_host.cpp"])
def test_nothing_of_the_host_is_readable(remote: Remote, probes: list[str], name: str) -> None:
    attack(remote, name, fills={"probes": probes, "probes_cpp": cpp_probes(probes)})


def test_no_oracle_in_the_problem_files(remote: Remote, probes: list[str]) -> None:
    problem = json.loads(BUNDLED.read_text().splitlines()[0])
    given, wanted = problem["public_tests"]["input"][0], problem["public_tests"]["output"][0]
    result = attack(remote, "py_oracle.py", [(given, wanted)], fills={"probes": probes})
    assert result["output"] == "not found\n"


def test_the_compiler_quotes_no_host_file(remote: Remote) -> None:
    result = attack(remote, "cpp_include_host_file.cpp", fills={"bundled": BUNDLED})
    assert "public_tests" not in result["stderr"] and "sum-of-two" not in result["stderr"]


# --- reading earlier tests ------------------------------------------------------------------------


def test_no_earlier_output_in_memory(remote: Remote) -> None:
    """Another sample of the same problem printed the answer on this worker; this one scans
    its whole memory for it."""
    given = secrets.token_hex(8) + "\n"
    answer = "rlef-earlier-" + secrets.token_hex(8)
    earlier = f"import sys\nsys.stdin.read()\nprint('\\n'.join([{answer!r}] * 50))\n"
    [[first]] = remote.run(job("python", earlier, [(given, (answer + "\n") * 50)]))
    assert first["verdict"] == "OK", first
    result = attack(remote, "py_scan_memory.py", [(given, answer + "\n")], time_s=10.0)
    assert result["output"] == "nothing\n", result


def test_no_earlier_file_or_binary(remote: Remote) -> None:
    token = "rlef-token-" + secrets.token_hex(8)
    language, source, _ = program("cpp_leave_token.cpp", token=token)
    [[left]] = remote.run(job(language, source, [("", "done\n")]))
    assert left["verdict"] == "OK", left
    roots = [remote.info["root"], str(remote.cache)]
    attack(remote, "py_read_earlier_files.py", fills={"token": token, "probes": roots}, time_s=8.0)
    attack(remote, "py_list_tmp.py")


# --- persisting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["py_deep_tree.py", "cpp_deep_tree.cpp", "py_fill_inodes.py", "py_fill_disk.py"]
)
def test_nothing_persists_into_the_next_test(remote: Remote, name: str) -> None:
    attack(remote, name, time_s=10.0)
    attack(remote, "py_list_tmp.py")


# --- the terminal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["py_terminal.py", "cpp_terminal.cpp"])
def test_the_operators_terminal_is_out_of_reach(remote: Remote, name: str) -> None:
    remote.typed_into_terminal()
    attack(remote, name)
    assert remote.typed_into_terminal() == b"", "a test typed into the operator's terminal"


# --- privileges -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["py_privileges.py", "py_prlimit_others.py", "cpp_prlimit_others.cpp"]
)
def test_no_privilege_over_anything_else(remote: Remote, name: str) -> None:
    attack(remote, name, fills={"executor_uid": remote.info["uid"]})


@pytest.mark.parametrize("name", ["py_tgkill_worker.py", "cpp_kill_others.cpp"])
def test_signals_reach_nothing_but_the_test(remote: Remote, name: str) -> None:
    attack(remote, name)


# --- breaking the worker ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["py_kill_others.py", "py_fake_setup_failure.py"])
def test_the_worker_survives(remote: Remote, name: str) -> None:
    attack(remote, name)


# --- fooling the judge ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("py_huge_integer.py", "8" * 5000 + "\n"),
        ("py_float_for_integer.py", "1000000000001\n"),
        ("py_many_tokens.py", "1\n"),
    ],
    ids=["huge_integer", "float_for_integer", "many_tokens"],
)
def test_the_judge_cannot_be_fooled(remote: Remote, name: str, expected: str) -> None:
    attack(remote, name, [("", expected)], output_bytes=32 << 20)


# --- exhausting memory, CPU, compile time -------------------------------------------------------


@pytest.mark.parametrize("name", ["py_thread_bomb.py", "cpp_thread_bomb.cpp"])
def test_threads_are_bounded(remote: Remote, name: str) -> None:
    """tests/hostile's thread bombs, in both modes: RLIMIT_NPROC counts the worker's uid as
    root, the test's own user namespace without root."""
    source = (Path(__file__).parent / "hostile" / name).read_text()
    language = "python" if name.endswith(".py") else "cpp"
    pids = remote.worker_pids()
    [[result]] = remote.run(job(language, source, [("", None)], processes=16))
    assert result["verdict"] == "RUNTIME_ERROR", describe(result)
    still_judging_right(remote, pids, language)


@pytest.mark.parametrize("name", ["py_memfd.py", "cpp_memfd.cpp"])
def test_no_memory_outside_the_limit(remote: Remote, name: str) -> None:
    attack(remote, name, memory_mb=64, time_s=10.0)


@pytest.mark.parametrize(
    "name", ["cpp_include_dev_zero.cpp", "cpp_include_ptmx.cpp", "cpp_compile_bomb.cpp"]
)
def test_compile_time_is_bounded_and_its_error_cached(remote: Remote, name: str) -> None:
    start = time.monotonic()
    first = attack(remote, name)
    took = time.monotonic() - start
    assert took < 45, f"the compile took {took:.0f} s"
    start = time.monotonic()
    attack(remote, name)
    assert time.monotonic() - start < took / 2 + 1, "the compile error was not cached"
    assert first["stderr"], first


@pytest.fixture(scope="module", params=MODES)
def remote_pair(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Remote]:
    yield from _remote(request, workdir, 2)


def test_one_workers_threads_starve_no_other_worker(remote_pair: Remote) -> None:
    """60 spinning threads (C++: no interpreter lock) on one worker; a test of 0.3 s CPU on the
    other, with a 3 s limit (its wall clock allows 3.5 s; sharing the machine's two CPUs with 60
    threads it would need ~9 s): it must pass, with the spinner at its own limit."""
    pids = remote_pair.worker_pids()
    language, spinner, _ = program("cpp_spin_threads.cpp")
    _, victim, _ = program("py_cpu_victim.py")
    [[compiled]] = remote_pair.run(job(language, spinner, [("", None)], time_s=0.05))
    assert compiled["verdict"] == "TIME_LIMIT", describe(compiled)
    spin, done = remote_pair.run(
        job(language, spinner, [("", None)], time_s=5.0),
        job("python", victim, [("", "done\n")], time_s=3.0),
    )
    assert done[0]["verdict"] == "OK", describe(done)
    assert spin[0]["verdict"] == "TIME_LIMIT", describe(spin)
    still_judging_right(remote_pair, pids, language)
