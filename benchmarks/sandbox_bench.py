"""Sandbox throughput and latency against the usual alternatives, and against the executor as
it was before the isolation of issue 27 (cf0390d, built side by side), all in one run.

    python benchmarks/sandbox_bench.py [--tests 2000] [--latency-samples 300]
                                       [--before cf0390d] [--baseline-tests 300]

Python a+b on one stdin test, and the same in C++:
- rlef executor, this checkout and `--before` (a git ref of this repository, extracted and its
  C++ executor built in a temporary directory; "" to skip), 1 and 2 workers. Each executor runs
  in a process of its own with its own tree on PYTHONPATH, one after the other.
- subprocess.run of a fresh interpreter per test (what most RL code-execution harnesses do)
- human-eval style: multiprocessing.Process per test with a reliability guard (no isolation
  beyond Python-level monkeypatching and rlimits)
- C++: subprocess.run of the compiled binary per test

Throughput: a batch of --tests tests, as many at once as the method has workers.
Latency: one test at a time, end to end as the caller sees it (p50, p99).
The machine should be quiet: every number here is wall-clock time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PY_SOURCE = "a, b = map(int, input().split())\nprint(a + b)\n"
CPP_SOURCE = (
    "#include <bits/stdc++.h>\n"
    "int main() { long long a, b; std::cin >> a >> b; std::cout << a + b << '\\n'; }\n"
)
TEST_INPUT, TEST_OUTPUT = "1 2\n", "3\n"
SUBPROCESS = "subprocess.run per test"
REPO = Path(__file__).resolve().parents[1]
GUARDED_OS_FUNCTIONS = (
    "kill system putenv remove removedirs rmdir fchdir setuid fork forkpty killpg rename renames "
    "truncate replace unlink fchmod fchown chmod chown chroot lchown getcwd chdir"
).split()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(run_one: Callable[[], bool], workers: int, n: int, samples: int) -> dict[str, float]:
    for _ in range(5):  # warm caches and pools
        assert run_one()
    latencies = []
    for _ in range(samples):
        start = time.perf_counter()
        assert run_one()
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        assert all(pool.map(lambda _: run_one(), range(n)))
    elapsed = time.perf_counter() - start
    return {
        "rate": n / elapsed,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
    }


# --- the rlef executor, in a process of its own -------------------------------------------------


def child(workers: int, n: int, samples: int) -> None:
    """Measures the rlef_hpc on sys.path (this checkout's or the --before tree's); prints JSON.
    Both use the default compile cache (its precompiled header takes a minute to build)."""
    from rlef_hpc.sandbox import Executor, TestCase

    test = TestCase(TEST_INPUT, TEST_OUTPUT)
    stats = {}
    with Executor(workers=workers) as ex:
        ex.run("cpp", CPP_SOURCE, [test])  # compile outside the timing
        for language, source in (("python", PY_SOURCE), ("cpp", CPP_SOURCE)):

            def one(language: str = language, source: str = source) -> bool:
                return ex.run(language, source, [test])[0].passed

            lat = measure(one, 1, 0, samples)
            start = time.perf_counter()
            results = ex.run(language, source, [test] * n)  # one job, spread over the workers
            elapsed = time.perf_counter() - start
            assert all(r.passed for r in results)
            service = percentile([r.wall_s for r in results], 0.5)
            stats[language] = {**lat, "rate": n / elapsed, "service_p50": service}
    print(json.dumps(stats))


def measure_tree(tree: Path, workers: int, n: int, samples: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, __file__, "--child", str(workers), str(n), str(samples)]
    out = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"sandbox_bench: the executor of {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def build_before(ref: str, into: Path) -> Path:
    """`ref`'s package and C++ executor, extracted from this repository and built in place."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "rlef_hpc", "csrc", "setup.py", "pyproject.toml"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"sandbox_bench: git archive {ref}: {archive.stderr.decode()[-500:]}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=into,
        env={**os.environ, "PYTHONPATH": str(into)},
        capture_output=True,
        check=True,
    )
    return into


# --- baselines -----------------------------------------------------------------------------------


def subprocess_runner(argv: list[str]) -> Callable[[], bool]:
    def one() -> bool:
        proc = subprocess.run(argv, input=TEST_INPUT, capture_output=True, text=True, timeout=10)
        return proc.stdout.split() == ["3"]

    return one


def _guarded_exec(source: str, stdin: str, results: list[str]) -> None:
    """What human-eval's unsafe_execute does: rlimits, then disable dangerous functions in
    Python (trivially bypassable), then exec the program with redirected stdio."""
    import builtins
    import resource
    import shutil

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    for name in GUARDED_OS_FUNCTIONS:
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None  # type: ignore[assignment]
    subprocess.Popen = None  # type: ignore[assignment,misc]
    out = io.StringIO()
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out):
            exec(source, {"__name__": "__main__", "__builtins__": builtins})
        results.append(out.getvalue())
    except BaseException as e:  # noqa: BLE001 - the baseline reports failures as results
        results.append(f"failed: {e}")


def human_eval_runner() -> Callable[[], bool]:
    manager = multiprocessing.Manager()

    def one() -> bool:
        results = manager.list()
        p = multiprocessing.Process(target=_guarded_exec, args=(PY_SOURCE, TEST_INPUT, results))
        p.start()
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
        return len(results) == 1 and results[0].split() == ["3"]

    return one


# --- report --------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        workers, n, samples = sys.argv[2:5]
        child(int(workers), int(n), int(samples))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=2000)
    parser.add_argument(
        "--baseline-tests", type=int, default=300, help="tests for the slow baselines"
    )
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--before", default="cf0390d", help='git ref to compare with ("": none)')
    args = parser.parse_args()
    from rlef_hpc.sandbox import capabilities

    caps = capabilities()
    print("isolation:", ", ".join(k for k, v in caps.items() if v is True))
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}\n")

    rows: list[tuple[str, str, int, dict[str, float]]] = []
    n, samples = args.baseline_tests, args.latency_samples
    with tempfile.TemporaryDirectory() as tmp:
        trees = [(f"rlef executor ({args.before}, before)", None)] if args.before else []
        trees.append(("rlef executor (this tree)", REPO))
        if args.before:
            before = Path(tmp, "before")
            before.mkdir()
            trees[0] = (trees[0][0], build_before(args.before, before))
        sol_py, sol_cpp, binary = Path(tmp, "sol.py"), Path(tmp, "sol.cpp"), Path(tmp, "sol")
        sol_py.write_text(PY_SOURCE)
        sol_cpp.write_text(CPP_SOURCE)
        subprocess.run(["g++", "-O2", "-o", binary, sol_cpp], check=True)
        fresh_python = subprocess_runner([sys.executable, str(sol_py)])
        fresh_binary = subprocess_runner([str(binary)])
        guarded = human_eval_runner()
        for w in (1, 2):
            rows.append(("python", SUBPROCESS, w, measure(fresh_python, w, n, 50)))
            rows.append(("python", "human-eval Process+guard", w, measure(guarded, w, n, 50)))
            rows.append(("cpp", SUBPROCESS, w, measure(fresh_binary, w, n, 50)))
            for name, tree in trees:
                stats = measure_tree(tree, w, args.tests, samples)  # type: ignore[arg-type]
                for language in ("python", "cpp"):
                    rows.append((language, name, w, stats[language]))

    base = {(lang, w): s["rate"] for lang, m, w, s in rows if m == SUBPROCESS}
    print(
        "| lang | method | workers | tests/s | vs subprocess | p50 ms | p99 ms | service p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for lang, method, w, s in sorted(rows, key=lambda r: (r[0], r[2], r[1] != SUBPROCESS)):
        service = f"{s['service_p50'] * 1e3:.2f}" if "service_p50" in s else "-"
        speedup = s["rate"] / base[lang, w]
        latency = f"{s['p50'] * 1e3:.2f} | {s['p99'] * 1e3:.2f}"
        cells = [lang, method, w, f"{s['rate']:.0f}", f"{speedup:.1f}x", latency, service]
        print("| " + " | ".join(map(str, cells)) + " |")
    print("\np50/p99: one test at a time, end to end (submit -> verdict) as the caller sees it.")
    print("service p50: the test's wall time inside the worker (fork/exec -> reaped), batch run.")


if __name__ == "__main__":
    main()
