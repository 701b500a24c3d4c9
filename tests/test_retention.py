"""Checkpoint retention with evaluation: the newest `keep_last` checkpoints are kept, and so are
the ones still to be evaluated and the best on valid so far, whatever their age."""

from __future__ import annotations

from rlef_hpc import atomic
from rlef_hpc.checkpoint import training
from rlef_hpc.eval.evaluator import record
from rlef_hpc.train.evaluation import protected
from tests.helpers import eval_result


def save(run, iteration, keep_last, keep=()):
    """What training.save does on disk, without a model: a complete checkpoint, committed."""
    tmp = run / f".tmp-iter_{iteration:07d}"
    tmp.mkdir(parents=True)
    (tmp / training.STATE).write_text("state")
    atomic.commit(tmp, run / f"iter_{iteration:07d}", iteration, "iter_*", keep_last, keep)


def result(iteration, valid):
    return eval_result(iteration, {"valid": {"1@3": valid}}, spread=0.0)


def test_keep_last_spares_the_names_kept(tmp_path):
    for i in range(1, 6):
        save(tmp_path, i, keep_last=2, keep={"iter_0000001"})
    assert sorted(training.committed(tmp_path)) == [1, 4, 5]
    assert (tmp_path / "latest").read_text().strip() == "5"
    save(tmp_path, 6, keep_last=2)  # no longer protected: pruned like any other
    assert sorted(training.committed(tmp_path)) == [5, 6]


def test_retention_never_deletes_the_best_or_a_pending_checkpoint(tmp_path):
    """A 16-iteration run, keep_last=2, eval_every=4; the evaluation worker lags the trainer by
    5 iterations. At every save, every due-but-unevaluated checkpoint and the best so far must
    still be there; everything else beyond the newest two must be gone."""
    eval_every, last, lag = 4, 16, 5
    valid = {0: 0.1, 4: 0.5, 8: 0.3, 12: 0.2, 16: 0.4}  # iteration 4 stays the best
    record(tmp_path, result(0, valid[0]), "1@3")  # the initial policy, before training
    for it in range(1, last + 1):
        done = it - lag  # the evaluation worker has just finished this one, if due
        if done in valid and done > 0:
            record(tmp_path, result(done, valid[done]), "1@3")
        kept = protected(tmp_path, "1@3", eval_every, last)
        save(tmp_path, it, keep_last=2, keep={f"iter_{i:07d}" for i in kept})
        on_disk = set(training.committed(tmp_path))
        due = {i for i in valid if 0 < i <= it}
        evaluated = {i for i in valid if 0 < i <= done}
        best_so_far = {max(evaluated, key=valid.get)} if evaluated else set()
        assert due - evaluated <= on_disk, it  # pending: kept
        assert best_so_far <= on_disk, it  # best: kept
        extra = on_disk - {it, it - 1} - (due - evaluated) - best_so_far
        assert not extra, (it, extra)  # nothing else kept
    # The end: 16 not yet evaluated (the worker lags) and 4, the best, survive with 15 and 16.
    assert set(training.committed(tmp_path)) == {4, 12, 15, 16}
