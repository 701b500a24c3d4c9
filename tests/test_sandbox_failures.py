"""When the sandbox itself fails: the job is marked (SANDBOX_ERROR), never an exception in the
caller; the worker is replaced, never reused; the comparison never raises on any output; an
episode the sandbox could not judge is marked, unrewarded and counted; and the executor refuses
to start, in one line, where an isolation it requires is missing."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlef_hpc import sandbox
from rlef_hpc.sandbox import Executor, Job, Limits, TestCase, TestResult, Verdict, outputs_match
from tests.test_episodes import RIGHT, WRONG, run, tokenizer  # noqa: F401 - tokenizer: a fixture

A_PLUS_B = "a, b = map(int, input().split())\nprint(a + b)\n"


# --- the comparison ----------------------------------------------------------------------------


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_the_comparison_never_raises(expected: bytes, actual: bytes) -> None:
    outputs_match(expected, actual)
    outputs_match(expected, actual, mode="exact")


@pytest.mark.parametrize(
    ("expected", "actual", "match"),
    [
        ("7" * 5000, "7" * 5000, True),
        ("7" * 5000, "+" + "7" * 5000, True),
        ("7" * 5000, "7" * 4999 + "8", False),
        ("8" * 5000, "7" * 5000, False),
        ("1000000000001", "1e12", False),  # within 1e-5 of it, and wrong
        ("5", "5.0", False),  # an integer answer takes an integer
        ("5", "005", True),
        ("-0", "0", True),
        ("1e400", "2e400", False),  # both float('inf'): equal only as decimals
        ("1e400", "1.000001e400", True),
        ("1e999999999999999999999", "1e999999999999999999999", True),
        ("1e999999999999999999999", "2e999999999999999999999", False),
        ("0.1", "1e-1", True),
    ],
)
def test_numbers_compare_exactly_where_they_must(expected: str, actual: str, match: bool) -> None:
    assert outputs_match(expected, actual) is match


def test_the_comparison_reads_no_more_tokens_than_expected() -> None:
    """30 MB of one-byte tokens against one expected: stop at the second, not split them all
    (splitting cost ~630 MB per worker in the trainer)."""
    flood = b"1 " * (15 << 20)
    tracemalloc.start()
    try:
        assert not outputs_match("1\n", flood)
        assert outputs_match(b"1 " * 3, b"1 1\t1\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak >> 20} MB to compare"


@pytest.mark.parametrize(
    "token",
    [b"1" * 10**6 + b"x", b"1" * 10**6 + b".", b"9" * 10**6 + b".5", b"1e" + b"9" * 10**6],
    ids=["digits_then_letter", "digits_then_point", "past_float", "huge_exponent"],
)
def test_the_comparison_takes_linear_time_on_any_token(token: bytes) -> None:
    """A million-character token where a real is expected: the number pattern used to backtrack
    over it quadratically (hours in the trainer's judging thread, for one test's output)."""

    def too_long(signum: int, frame: object) -> None:
        raise TimeoutError  # the regex engine checks for signals as it goes

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        outputs_match(b"0.5\n", token)
    except TimeoutError:
        pytest.fail("the judge spent more than 5 s on one token")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- the executor ------------------------------------------------------------------------------


def test_an_exception_on_a_job_replaces_the_worker_and_marks_the_job(monkeypatch) -> None:
    """Whatever raises while a job's reports are read (here the comparison), the worker is
    killed (its channel may hold unread reports) and a fresh one tries again; failing twice,
    the tests are SANDBOX_ERROR results, counted, and the executor serves on."""
    from rlef_hpc.sandbox import executor as module

    def broken(expected, actual, mode="tokens"):
        raise ValueError("the comparison broke")

    with Executor(workers=1) as ex:
        first = ex.worker_pids()
        monkeypatch.setattr(module, "outputs_match", broken)
        results = ex.run("python", A_PLUS_B, [TestCase("1 2\n", "3\n"), TestCase("2 2\n", "4\n")])
        assert [r.verdict for r in results] == [Verdict.SANDBOX_ERROR] * 2
        assert "the comparison broke" in results[0].stderr
        assert ex.sandbox_errors == 2 and ex.worker_restarts == 2
        assert ex.worker_pids() != first
        monkeypatch.undo()
        [after] = ex.run("python", A_PLUS_B, [TestCase("2 3\n", "5\n")])
        assert after.verdict == Verdict.OK, after.stderr


def test_the_compile_cache_stays_within_its_budget(tmp_path: Path) -> None:
    """Every distinct C++ source used to stay in the host's cache for good, each binary up to
    the compile's 64 MiB file limit: a run's samples, or a policy that makes large binaries
    (15 MiB of source-less table here), filled the disk. The oldest go first; a binary that went
    is compiled again when needed."""
    table = (Path(__file__).parent / "adversarial" / "cpp_big_table.cpp").read_text()
    sources = [table.replace("@SEED@", f"seed {i}") for i in range(5)]
    with Executor(workers=1, cache_dir=tmp_path, cache_mb=40) as ex:
        for source in [*sources, sources[0]]:
            [result] = ex.run("cpp", source, [TestCase("", "1\n")], Limits(time_s=5))
            assert result.verdict == Verdict.OK, result.stderr
            kept = [f for d in ("bin", "err") for f in tmp_path.glob(f"cxx-*/{d}/*")]
            assert sum(f.stat().st_size for f in kept) <= 40 << 20, [f.name for f in kept]
        assert ex.worker_restarts == 0


def _template_pids(ex: Executor) -> list[int]:
    """The executor's template processes, found from outside as the red team would."""
    namespaces = set()
    for launcher in ex.worker_pids():
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        namespaces.update(os.readlink(f"/proc/{c}/ns/pid") for c in children)
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "ns/pid") in namespaces:
                if (proc / "comm").read_text().strip() == "rlef-template":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_broken_worker_is_replaced_and_its_job_run_on_a_fresh_one() -> None:
    """The template gone (killed from outside): the worker cannot start a Python test, says so
    (never as a verdict), and is replaced; the job passes on the fresh worker."""
    with Executor(workers=1) as ex:
        assert ex.run("python", A_PLUS_B, [TestCase("1 2\n", "3\n")])[0].passed
        [template] = _template_pids(ex)
        os.kill(template, signal.SIGKILL)
        results = ex.run("python", A_PLUS_B, [TestCase("1 2\n", "3\n"), TestCase("2 2\n", "4\n")])
        assert [r.verdict for r in results] == [Verdict.OK, Verdict.OK], results
        assert ex.worker_restarts == 1 and ex.sandbox_errors == 0


def test_capabilities_say_what_the_kernel_offers() -> None:
    caps = sandbox.capabilities()
    kernel = caps["kernel"]
    assert {"cgroup_v1", "cgroup_v2", "landlock_abi", "user_namespaces", "seccomp"} <= set(kernel)
    assert caps["minimal_root"] and caps["no_tty"] and caps["cpu_pinned"]
    assert caps["uid_drop"] or caps["unmapped_uid"]
    assert caps["landlock"] == (kernel["landlock_abi"] >= 1)


def test_refuses_in_one_line_where_a_required_isolation_is_missing() -> None:
    with pytest.raises(sandbox.SandboxUnavailableError) as refused:
        Executor(workers=1, seccomp=False)
    message = str(refused.value)
    assert "seccomp" in message and "allow_missing=['seccomp']" in message
    assert "\n" not in message
    with Executor(workers=1, seccomp=False, allow_missing=["seccomp"]) as ex:
        assert ex.run("python", "print(2)\n", [TestCase("", "2\n")])[0].passed
    with pytest.raises(ValueError, match="allow_missing: unknown"):
        Executor(workers=1, allow_missing=["seccom"])


def test_cli_allow_missing_is_checked(capsys, tmp_path) -> None:
    from rlef_hpc.sandbox.cli import main

    source, tests = tmp_path / "s.py", tmp_path / "t.jsonl"
    source.write_text("print(1)\n")
    tests.write_text('{"input": "", "output": "1"}\n')
    with pytest.raises(SystemExit) as code:
        main(["--lang", "python", "--source", str(source), "--tests", str(tests),
              "--allow-missing", "landlock,nonsense"])  # fmt: skip
    assert code.value.code == 2
    assert "unknown nonsense" in capsys.readouterr().err


# --- the episode runner --------------------------------------------------------------------------


class BrokenSandbox:
    """An executor whose jobs end as `outcome`: a list of results, or an exception."""

    def __init__(self, outcome: object) -> None:
        self.outcome = outcome

    def submit(self, job: Job) -> concurrent.futures.Future[list[TestResult]]:
        future: concurrent.futures.Future[list[TestResult]] = concurrent.futures.Future()
        if isinstance(self.outcome, Exception):
            future.set_exception(self.outcome)
        else:
            error = TestResult(Verdict.SANDBOX_ERROR, 0.0, 0.0, 0, "", "worker failed", -1)
            future.set_result([error for _ in job.tests])
        return future


@pytest.mark.parametrize("outcome", ["results", "exception"])
def test_an_episode_the_sandbox_could_not_judge_is_marked_not_punished(
    tokenizer,  # noqa: F811 - the fixture
    outcome: str,
) -> None:
    from rlef_hpc.train.metrics import episode_metrics

    broken = BrokenSandbox(RuntimeError("executor is closed") if outcome == "exception" else [])
    [t] = run(tokenizer, broken, [[WRONG, RIGHT]])
    assert t.sandbox_error and not t.success
    assert len(t.turns) == 1 and t.turns[0].reward == 0.0  # no -1, no second turn
    if outcome == "results":
        assert t.turns[0].public_verdicts == ["SANDBOX_ERROR", "SANDBOX_ERROR"]
    metrics = episode_metrics([t], max_turns=3)
    assert metrics["sandbox_error_rate"] == 1.0 and metrics["reward_mean"] == 0.0


def test_an_episode_the_sandbox_could_not_judge_is_not_in_the_ppo_batch(
    tokenizer,  # noqa: F811 - the fixture
    executor,
) -> None:
    """Its reward (0, or -0.2 after an invalid turn) is better than a failure's -1: trained on,
    breaking the judge would pay. Its row of the batch is empty (the row keeps every rank's
    minibatch split), and the advantages are normalised over the judged turns alone."""
    from rlef_hpc.rl import ppo

    judged = run(tokenizer, executor, [[WRONG, WRONG, WRONG], [WRONG, RIGHT]])
    [broken] = run(tokenizer, BrokenSandbox([]), [[WRONG, RIGHT]])
    assert not broken.trainable and all(t.trainable for t in judged)
    batch = ppo.collate([judged[0], broken, judged[1]])
    alone = ppo.collate(judged)
    assert not batch.response_mask[1].any() and not batch.turn_mask[1].any()
    assert int(ppo.row_lengths(batch)[1]) == 1  # an empty row costs one position
    rows = torch.tensor([0, 2])
    for name in ("tokens", "response_mask", "turn_mask", "turn_reward", "logp_behaviour"):
        assert torch.equal(getattr(batch, name)[rows], getattr(alone, name)), name
    values = torch.linspace(-0.5, 0.5, batch.turn_mask.numel()).reshape(batch.turn_mask.shape)
    advantages = [
        ppo.advantages(ppo.monte_carlo_returns(b.turn_reward, b.turn_mask), v, b.turn_mask, "turn")
        for b, v in ((batch, values), (alone, values[rows]))
    ]
    assert torch.allclose(advantages[0][rows], advantages[1], atol=1e-6)
    assert not advantages[0][1].any()


def test_the_trainer_leaves_sandbox_errors_out_and_skips_an_update_of_nothing_but_them() -> None:
    """The loop's own iteration with a real PPO update on a tiny model (tests/scripts/
    sandbox_error_update.py, about 10 s): errors in the batch change nothing of the update,
    a minibatch of errors alone leaves the weights finite, a batch of errors alone skips the
    update (the source's hooks still run), and the counts reach the iteration's metrics."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    script = repo / "tests" / "scripts" / "sandbox_error_update.py"
    env = {**os.environ, "PYTHONPATH": str(repo), "MASTER_PORT": str(29600 + os.getpid() % 300)}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    mixed = out["mixed"]
    assert mixed["moved"] > 1e-4  # the update did train on a and b...
    # ...as without the errors: 0.0 measured; what differs is at most the summation order of
    # the micro-batches (float32 rounding of updates ~1e-3)
    assert mixed["max_diff"] <= 1e-6
    m = mixed["metrics"]
    assert (m["trained_episodes"], m["sandbox_errors"]) == (2, 2)
    assert (m["sandbox_test_errors"], m["sandbox_worker_restarts"]) == (3, 2)
    assert out["empty_minibatch"] == {"finite": True, "steps": 1}
    every = out["all_errors"]
    assert every["steps"] == 0 and every["moved"] == 0.0
    assert every["hooks"] == ["before_update", "after_update"]
    assert every["metrics"]["update_skipped"] == 1.0 and every["metrics"]["sandbox_errors"] == 2
    assert "the update is skipped" in proc.stdout


def test_the_workers_logs_are_the_callers_alone() -> None:
    """What a worker logs (a test's set-up failure, its tracebacks) is in a 0700 directory:
    no channel between tests, or to other users."""
    with Executor(workers=1) as ex:
        assert os.stat(ex._root).st_mode & 0o777 == 0o700
        assert list(Path(ex._root).glob("*.log"))


def test_a_tmp_that_cannot_be_cleared_ends_the_worker(tmp_path) -> None:
    """The tests' /tmp is replaced by a fresh tmpfs after a test that left anything; where
    that fails the server must not serve on (it raises SandboxSetupError, which ends it: see
    test_a_broken_worker_is_replaced_and_its_job_run_on_a_fresh_one for the replacement)."""
    import dataclasses

    from rlef_hpc.sandbox.isolation import Sandbox, SandboxSetupError
    from rlef_hpc.sandbox.runner import Runner

    fields = {f.name: None for f in dataclasses.fields(Sandbox)}
    (tmp_path / "left").write_text("by a test")
    sandbox_view = Sandbox(
        **{
            **fields,
            "capabilities": {"minimal_root": True},
            "workdir": str(tmp_path),  # not a mount point: unmounting it fails
            "tmp_options": "size=1m",
        }
    )
    with pytest.raises(SandboxSetupError, match="cannot clear the tests' /tmp"):
        Runner(sandbox_view, None)._clear_tmp()  # type: ignore[arg-type]
