"""The run's problems: which ones it trains and evaluates on, and the one seeded order in which
training draws them, shared by the trainer's own engines and the rollout workers."""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from rlef_hpc import atomic
from rlef_hpc.data import synthetic
from rlef_hpc.data.codecontests import load_problems as load_codecontests
from rlef_hpc.data.codecontests import problem_record
from rlef_hpc.data.problem import Problem
from rlef_hpc.train.config import TrainConfig


def load_problems(cfg: TrainConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, valid) problems."""
    d = cfg.data
    if d.source == "synthetic":
        drawn = []
        for key, n, split in (
            ("train", d.train_problems, "train"),
            ("valid", d.valid_problems, "heldout"),
        ):
            try:
                drawn.append(synthetic.generate(n, split, d.seed, d.curriculum))
            except ValueError as e:
                raise ValueError(f"data.{key}_problems={n}: {e}") from None
        return drawn[0], drawn[1]
    train = load_codecontests(d.train_path)
    valid = load_codecontests(d.valid_path)[: d.valid_problems] if d.valid_path else []
    return train, valid


def load_test_problems(cfg: TrainConfig) -> list[Problem]:
    """The test set: reported for the checkpoint selected on valid, never selected on.
    Synthetic: the held-out instances drawn after the valid ones (the draw is sequential, so
    the valid set is the same with or without a test set), disjoint from them."""
    d = cfg.data
    if d.source == "synthetic":
        if not d.test_problems:
            return []
        drawn = d.valid_problems + d.test_problems
        try:
            both = synthetic.generate(drawn, "heldout", d.seed, d.curriculum)
        except ValueError as e:
            raise ValueError(
                f"data.valid_problems={d.valid_problems} + data.test_problems={d.test_problems}: "
                f"the {d.curriculum} curriculum has fewer held-out problems ({e})"
            ) from None
        return both[d.valid_problems :]
    if not d.test_path:
        return []
    test = load_codecontests(d.test_path)
    return test[: d.test_problems] if d.test_problems else test


def write_problems(problems: list[Problem], path: Path) -> None:
    """Problems as CodeContests JSON lines (what rlef-eval and evaluation jobs read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, "".join(json.dumps(problem_record(p)) + "\n" for p in problems))


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"{seed}:epoch{epoch}").shuffle(order)
    return tuple(order)


def draw(problems: list[Problem], seed: int, first: int, count: int, samples: int) -> list[Problem]:
    """Problems `first` .. `first + count - 1` of the run's stream (every problem once per
    epoch, in an order reshuffled each epoch from `seed`), each repeated `samples` times.
    Iteration k of a colocated run draws the k-th block of the stream; rollout worker w's
    shard s of a run with W workers draws block s * W + w."""
    n = len(problems)
    drawn = []
    for i in range(first, first + count):
        drawn += [problems[_epoch_order(seed, i // n, n)[i % n]]] * samples
    return drawn
