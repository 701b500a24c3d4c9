"""Sandbox throughput and latency against the usual alternatives, all in one run, same machine.

    python benchmarks/sandbox_bench.py [--tests 2000] [--latency-samples 300]

Python a+b on one stdin test, and the same in C++:
- rlef executor, 1 and 2 workers (namespaces + seccomp + rlimits + uid drop, as capabilities say)
- subprocess.run of a fresh interpreter per test (what most RL code-execution harnesses do)
- human-eval style: multiprocessing.Process per test with a reliability guard (no isolation
  beyond Python-level monkeypatching and rlimits)
- C++: subprocess.run of the compiled binary per test

Throughput: a batch of --tests tests, as many at once as the method has workers.
Latency: one test at a time on an idle system, end to end as the caller sees it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rlef_hpc.sandbox import Executor, TestCase, capabilities

PY_SOURCE = "a, b = map(int, input().split())\nprint(a + b)\n"
CPP_SOURCE = (
    "#include <bits/stdc++.h>\n"
    "int main() { long long a, b; std::cin >> a >> b; std::cout << a + b << '\\n'; }\n"
)
TEST = TestCase("1 2\n", "3\n")
SUBPROCESS = "subprocess.run per test"
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


def measure_executor(
    ex: Executor, language: str, source: str, n: int, samples: int
) -> dict[str, float]:
    def one() -> bool:
        return ex.run(language, source, [TEST])[0].passed

    stats = measure(one, 1, 0, samples) if samples else {}
    start = time.perf_counter()
    results = ex.run(language, source, [TEST] * n)  # one job: the executor spreads it over workers
    elapsed = time.perf_counter() - start
    assert all(r.passed for r in results)
    service = [r.wall_s for r in results]
    return {**stats, "rate": n / elapsed, "service_p50": percentile(service, 0.5)}


# --- baselines -----------------------------------------------------------------------------------


def subprocess_runner(argv: list[str]) -> Callable[[], bool]:
    def one() -> bool:
        proc = subprocess.run(argv, input=TEST.input, capture_output=True, text=True, timeout=10)
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
        p = multiprocessing.Process(target=_guarded_exec, args=(PY_SOURCE, TEST.input, results))
        p.start()
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
        return len(results) == 1 and results[0].split() == ["3"]

    return one


# --- report --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=2000)
    parser.add_argument(
        "--baseline-tests", type=int, default=300, help="tests for the slow baselines"
    )
    parser.add_argument("--latency-samples", type=int, default=300)
    args = parser.parse_args()
    caps = capabilities()
    print("isolation:", ", ".join(k for k, v in caps.items() if v is True))
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}\n")

    rows: list[tuple[str, str, int, dict[str, float]]] = []
    n, samples = args.baseline_tests, args.latency_samples
    with tempfile.TemporaryDirectory() as tmp:
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
            with Executor(workers=w, cache_dir=Path(tmp, "cache")) as ex:
                ex.run("cpp", CPP_SOURCE, [TEST])  # compile outside the timing
                for lang, source in (("python", PY_SOURCE), ("cpp", CPP_SOURCE)):
                    stats = measure_executor(ex, lang, source, args.tests, samples)
                    rows.append((lang, "rlef executor", w, stats))

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
    from rlef_hpc import runtime

    runtime.setup()
    main()
