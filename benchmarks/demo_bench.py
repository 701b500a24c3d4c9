"""Where the CPU demo's time goes (`make run`: rlef-train configs/demo_cpu.yaml, OMP_NUM_THREADS=2),
phase by phase, at a baseline commit and at the working tree, in the same run.

    python benchmarks/demo_bench.py [--baseline cf0390d] [--rounds 1 | --seeds S ...]
        [--lock PATH] [--set KEY=VALUE ...] [--out PATH] [--keep DIR]

The baseline is checked out into a temporary git worktree (its C++ executor built there); the
two arms alternate `--rounds` times (baseline first), each a fresh `rlef-train` process on a
fresh run directory, and each arm reports the median of its rounds. `--seeds 0 3 4` makes one
round per seed (run.seed=S in both arms): the learning across seeds, each arm's pooled held-out
1@3 after RLEF as a mean and range, besides the phases. `--lock PATH` holds an
flock on PATH around each run only (on a shared machine: /tmp/rlef-heavy.lock), so that others
can go between runs.

Phases are measured inside the trainer process, by wrapping the functions that own them (the
same names at both commits; a name that is missing is reported, and its time counts as other):

    start-up       imports, config, process groups, problems, the engine's start, the models
                   and optimizers built (Trainer.__init__ less the initial policy)
    warm start     the initial policy: tokenizer, demonstrations, supervised steps, saved
                   (build_initial_policy)
    rollout        the training episodes (the rollout source's batch)
    update         collate and the PPO update (PPOUpdate.step)
    refit          the new weights into the engine and the refit check (after_update)
    checkpoint     Trainer.save and the wait for background saves
    evaluation     the evaluator (valid and test, before, during and after RLEF)
    logging/other  metrics.jsonl, TensorBoard, plots, the end (best export, summary, exit)

Wall seconds, and CPU seconds (user + system) of the trainer's whole process tree (sandbox
workers included): CPU time is what to compare on a loaded machine, where wall time is noise.
CPU is counted in the phase running when it is spent: a checkpoint written in the background
(run.async_save) counts in the phase it overlaps (mostly the next rollout).
Also shown: each run's held-out 1@3 before and after RLEF (valid, test, and pooled), and the
load average at its start and end.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = "configs/demo_cpu.yaml"
PHASES = (
    "start-up",
    "warm start",
    "rollout",
    "update",
    "refit",
    "checkpoint",
    "evaluation",
    "logging/other",
)
# (module, attribute path, phase): what is timed as which phase. Nested calls count for the
# innermost phase (an evaluation's episodes are evaluation, not rollout). Where a function was
# renamed or moved, both names are listed: a name that is missing is reported only when no
# other hook of its phase exists at that commit.
HOOKS = (
    ("rlef_hpc.train.loop", "Trainer.__init__", "start-up"),
    ("rlef_hpc.train.loop", "build_initial_policy", "warm start"),
    ("rlef_hpc.train.loop", "Trainer.run", "logging/other"),
    ("rlef_hpc.train.loop", "Trainer.evaluate", "evaluation"),  # cf0390d
    ("rlef_hpc.train.evaluation", "TrainerEvaluation.__call__", "evaluation"),  # since 51ebe5c
    ("rlef_hpc.train.loop", "Trainer.save", "checkpoint"),
    ("rlef_hpc.train.sources", "Colocated.batch", "rollout"),
    ("rlef_hpc.train.sources", "AsyncColocated.batch", "rollout"),
    ("rlef_hpc.train.loop", "collate", "update"),
    ("rlef_hpc.rl.update", "PPOUpdate.step", "update"),
    ("rlef_hpc.train.sources", "Colocated.after_update", "refit"),
    ("rlef_hpc.train.sources", "AsyncColocated.after_update", "refit"),
    (
        "megatron.core.dist_checkpointing.strategies.async_utils",
        "AsyncCallsQueue.maybe_finalize_async_calls",
        "checkpoint",
    ),
)


# --- inside the trainer process -----------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """User + system seconds of `pid` and every live descendant, and of their waited-for
    children (/proc: utime, stime, cutime, cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = sum(int(f) for f in fields[11:15])
    total = 0
    for p, t in times.items():
        q = p
        while q not in (0, 1) and q != pid:
            q = parents.get(q, 0)
        if q == pid:
            total += t
    return total / tick


class PhaseClock:
    """Wall and process-tree CPU seconds per phase; a stack, so that the innermost phase
    counts."""

    def __init__(self, first: str) -> None:
        self.pid = os.getpid()
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self.stack = [first]
        self.mark = (time.perf_counter(), tree_cpu_seconds(self.pid))

    def _switch(self) -> None:
        now = (time.perf_counter(), tree_cpu_seconds(self.pid))
        self.wall[self.stack[-1]] += now[0] - self.mark[0]
        self.cpu[self.stack[-1]] += now[1] - self.mark[1]
        self.mark = now

    @contextmanager
    def phase(self, name: str) -> Any:
        self._switch()
        self.stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self.stack.pop()

    def report(self) -> dict[str, dict[str, float]]:
        self._switch()
        return {"wall": self.wall, "cpu": self.cpu}


def install_hooks(clock: PhaseClock) -> list[str]:
    """Wraps every HOOKS function that exists; returns those that do not, of the phases that
    none of their hooks found."""
    missing, found = [], set()
    for module_name, path, phase in HOOKS:
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            missing.append(f"{module_name}.{path}")
            continue
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part, None)
        function = getattr(owner, name, None) if owner is not None else None
        if function is None or (outer and name not in vars(owner)):  # inherited: wrapped once
            if function is None:
                missing.append(f"{module_name}.{path}")
            continue

        def wrapped(*args: Any, _f: Any = function, _p: str = phase, **kwargs: Any) -> Any:
            with clock.phase(_p):
                return _f(*args, **kwargs)

        setattr(owner, name, functools.wraps(function)(wrapped))
        found.add(phase)
    phase_of = {f"{m}.{p}": phase for m, p, phase in HOOKS}
    return [name for name in missing if phase_of[name] not in found]


def child(run_dir: str, out: str, overrides: list[str]) -> None:
    """Runs the demo in this process (cwd: the tree under test, on sys.path) with the phase
    hooks; writes the phases to `out` at exit."""
    sys.path.insert(0, os.getcwd())
    clock = PhaseClock("start-up")
    result: dict[str, Any] = {}

    def write() -> None:
        with clock.phase("logging/other"):  # the interpreter's own exit is not measured
            pass
        result.update(clock.report())
        Path(out).write_text(json.dumps(result))

    atexit.register(write)  # registered first: runs after the trainer's own exit handlers
    from rlef_hpc.train import cli  # noqa: E402 (the tree under test, found via cwd)

    result["missing_hooks"] = install_hooks(clock)
    code = cli.main([CONFIG, f"run.dir={run_dir}", *overrides])
    # after the run: what remains (teardown) is other
    clock.stack[0] = "logging/other"
    sys.exit(code)


# --- the driver ---------------------------------------------------------------------------------


def run_git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@contextmanager
def baseline_tree(commit: str) -> Any:
    """A temporary worktree at `commit` with its executor built in place."""
    where = Path(tempfile.mkdtemp(prefix="demo-bench-base-"))
    run_git("worktree", "add", "--detach", str(where), commit)
    try:
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=where,
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(where)},
        )
        yield where
    finally:
        run_git("worktree", "remove", "--force", str(where))
        shutil.rmtree(where, ignore_errors=True)


def lock(path: str | None) -> Any:
    if path is None:
        return ExitStack()
    import fcntl

    @contextmanager
    def held() -> Any:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return held()


def held_out_1at3(run_dir: Path) -> dict[str, tuple[float, float]]:
    """1@3 before (iteration 0) and after RLEF (the last evaluation) on each held-out set, and
    on all of them pooled (weighted by problems: what docs/training.md's seed table reports)."""
    path = run_dir / "eval" / "results.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records.sort(key=lambda r: r["iteration"])
    out: dict[str, tuple[float, float]] = {}
    for name in records[0]["sets"]:
        ends = [r["sets"][name] for r in (records[0], records[-1])]
        out[name] = tuple(e["metrics"]["1@3"]["mean"] for e in ends)

    def pooled(record: dict[str, Any]) -> float:
        sets = record["sets"].values()
        total = sum(s["problems"] for s in sets)
        return sum(s["metrics"]["1@3"]["mean"] * s["problems"] for s in sets) / total

    out["held-out"] = (pooled(records[0]), pooled(records[-1]))
    return out


def run_arm(
    tree: Path, work: Path, label: str, overrides: list[str], lock_path: str | None
) -> dict:
    """One demo run of the tree at `tree`; its phases, totals and result."""
    run_dir = work / label
    shutil.rmtree(run_dir, ignore_errors=True)
    out = work / f"{label}.phases.json"
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(run_dir), str(out)]
    command += [a for o in overrides for a in ("--set", o)]
    with lock(lock_path):
        load = os.getloadavg()[0]
        start = time.perf_counter()
        with open(work / f"{label}.log", "w") as log:
            process = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=log)
            _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()[0]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label}: the demo failed (exit {status}); see {work / label}.log")
    phases = json.loads(out.read_text())
    cpu = usage.ru_utime + usage.ru_stime
    # the process's start and exit around the measured phases: other
    phases["wall"]["logging/other"] += max(0.0, wall - sum(phases["wall"].values()))
    phases["cpu"]["logging/other"] += max(0.0, cpu - sum(phases["cpu"].values()))
    return {
        "wall": {**phases["wall"], "total": wall},
        "cpu": {**phases["cpu"], "total": cpu},
        "missing_hooks": phases.get("missing_hooks", []),
        "1@3": held_out_1at3(run_dir),
        "load": (load, load_after),
    }


def median_arm(runs: list[dict]) -> dict:
    keys = (*PHASES, "total")
    return {
        kind: {k: statistics.median(r[kind][k] for r in runs) for k in keys}
        for kind in ("wall", "cpu")
    }


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def table(arms: dict[str, list[dict]], labels: dict[str, str]) -> str:
    med = {name: median_arm(runs) for name, runs in arms.items()}
    base, new = med["baseline"], med["working"]
    head = (
        f"| phase | {labels['baseline']} wall s | {labels['working']} wall s | "
        f"{labels['baseline']} CPU s | {labels['working']} CPU s |"
    )
    lines = [head, "|---|---:|---:|---:|---:|"]
    for k in (*PHASES, "total"):
        name = f"**{k}**" if k == "total" else k
        lines.append(
            f"| {name} | {base['wall'][k]:.1f} | {new['wall'][k]:.1f} | "
            f"{base['cpu'][k]:.1f} | {new['cpu'][k]:.1f} |"
        )
    lines.append("")
    for name, runs in arms.items():
        for i, r in enumerate(runs):
            result = ", ".join(
                f"{k} {percent(a)} -> {percent(b)}" for k, (a, b) in r["1@3"].items()
            )
            lines.append(
                f"{labels[name]} round {i + 1}{' (' + r['seed'] + ')' if r.get('seed') else ''}: "
                f"1@3 before -> after RLEF: {result}; "
                f"load average {r['load'][0]:.2f} at start, {r['load'][1]:.2f} at end"
                + (
                    f"; hooks not found: {', '.join(r['missing_hooks'])}"
                    if r["missing_hooks"]
                    else ""
                )
            )
    if any(r.get("seed") for runs in arms.values() for r in runs):
        lines.append("")
        for name, runs in arms.items():
            after = [r["1@3"]["held-out"][1] for r in runs]
            lines.append(
                f"{labels[name]}: pooled held-out 1@3 after RLEF over {len(after)} seeds: mean "
                f"{percent(statistics.mean(after))}, range {percent(min(after))}-"
                f"{percent(max(after))}"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="cf0390d", help="commit to compare with")
    p.add_argument("--rounds", type=int, default=1, help="runs per arm, alternating")
    p.add_argument(
        "--seeds", type=int, nargs="+", metavar="S", help="one round per run.seed S (both arms)"
    )
    p.add_argument("--lock", help="flock this file around each run (shared machines)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both arms")  # fmt: skip
    p.add_argument("--out", help="also write the table (and the raw numbers as .json) here")
    p.add_argument("--keep", help="keep the run directories and logs in this folder")
    p.add_argument(
        "--check-hooks",
        action="store_true",
        help="only say which phases find none of their functions in this tree (exit 1 if any)",
    )
    p.add_argument("--child", nargs=2, metavar=("RUN_DIR", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.check_hooks:
        missing = install_hooks(PhaseClock("start-up"))
        print("hooks not found: " + (", ".join(missing) or "none"))
        sys.exit(1 if missing else 0)
    if args.child:
        child(*args.child, args.set)
        return
    # SIGTERM (a timeout, a kill) still removes the temporary worktree
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(args.keep or tempfile.mkdtemp(prefix="demo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    commit = run_git("rev-parse", "--short", args.baseline)
    head = run_git("rev-parse", "--short", "HEAD")
    dirty = " + changes" if run_git("status", "--porcelain", "--untracked-files=no") else ""
    labels = {"baseline": commit, "working": f"{head}{dirty}"}
    arms: dict[str, list[dict]] = {"baseline": [], "working": []}
    try:
        rounds = [[f"run.seed={s}"] for s in args.seeds] if args.seeds else [[]] * args.rounds
        with baseline_tree(commit) as base:
            for i, seed in enumerate(rounds):
                for name, tree in (("baseline", base), ("working", ROOT)):
                    label = f"{name}{i + 1}"
                    print(f"running {label} ({labels[name]}{' ' + seed[0] if seed else ''})...",
                          flush=True)  # fmt: skip
                    arms[name].append(run_arm(tree, work, label, [*args.set, *seed], args.lock))
                    arms[name][-1]["seed"] = seed[0] if seed else None
                    print(f"  {arms[name][-1]['wall']['total']:.1f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = (
        f"the demo (rlef-train {CONFIG}{' ' + ' '.join(args.set) if args.set else ''}, "
        f"OMP_NUM_THREADS=2), {os.cpu_count()} CPUs, median of {len(rounds)} round(s)\n\n"
        + table(arms, labels)
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(arms, indent=1))


if __name__ == "__main__":
    main()
