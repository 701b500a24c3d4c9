"""Which checkpoints a run keeps besides the newest `run.keep_last`: those due for evaluation
and not evaluated yet (the trainer's next evaluation or the evaluation job reads them), and the
best evaluated so far (exported or re-evaluated at any time). training.save() prunes the rest.

Which iterations are due for evaluation is decided here too, once, for the trainer, the
evaluation job and retention alike: the initial policy (iteration 0), every `eval_every`-th and
the run's `last`. What was evaluated, and which was best, the caller reads from the run's
evaluation results (rlef_hpc.eval.results): this layer knows checkpoints, not evaluations.
"""

from __future__ import annotations

from collections.abc import Iterable


def is_due(iteration: int, eval_every: int, last: int) -> bool:
    """Iteration 0 (the initial policy), every `eval_every`-th (0: none between) and `last`."""
    return iteration == 0 or iteration == last or bool(eval_every and iteration % eval_every == 0)


def pending(
    checkpoints: Iterable[int], done: Iterable[int], eval_every: int, last: int
) -> list[int]:
    """Iterations among `checkpoints` that are due and not in `done`, oldest first."""
    finished = set(done)
    return sorted(i for i in checkpoints if is_due(i, eval_every, last) and i not in finished)


def protected(
    checkpoints: Iterable[int],
    evaluated: Iterable[int],
    best: int | None,
    eval_every: int,
    last: int,
) -> set[int]:
    """The iterations retention must keep beyond the newest few: the due checkpoints not yet
    evaluated, and the `best` evaluated one (None: none yet)."""
    keep = set(pending(checkpoints, evaluated, eval_every, last))
    if best is not None:
        keep.add(best)
    return keep
