"""A run's evaluation results as text: the learning curve as a markdown table (eval/curve.md,
tools/submit.py status), the trainer's before/after table, and the selected checkpoint's line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rlef_hpc.eval.results import SELECTION_SET, CheckpointResult, best


def columns(records: Sequence[CheckpointResult]) -> list[tuple[str, str]]:
    """(set, metric) pairs present in any record, valid first, then test, then the others."""
    seen: dict[tuple[str, str], None] = {}
    for r in records:
        for s, result in r.sets.items():
            for m in result.metrics:
                seen[(s, m)] = None
    order = {"valid": 0, "test": 1}
    return sorted(seen, key=lambda c: (order.get(c[0], 2), c[0]))


def _cell(record: CheckpointResult, set_name: str, metric: str) -> str:
    row = record.estimate(metric, set_name)
    if row is None:
        return "-"
    return f"{100 * row.mean:.1f}% [{100 * row.low:.1f}, {100 * row.high:.1f}]"


def curve_table(
    records: Sequence[CheckpointResult],
    select: str | None = "1@3",
    labels: Mapping[int, str] | None = None,
) -> str:
    """Markdown: one row per evaluated checkpoint (its iteration, or `labels`' name for it),
    one column per (set, metric) with its 95% bootstrap interval; the checkpoint selected on
    valid by `select` is marked (None: no selection)."""
    labels = labels or {}
    cols = columns(records)
    chosen = best(records, select) if select else None
    header = ["iteration", *(f"{s} {m}" for s, m in cols)]
    lines = [f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
    for r in sorted(records, key=lambda r: r.iteration):
        mark = " (best)" if chosen is not None and r.iteration == chosen.iteration else ""
        label = labels.get(r.iteration, str(r.iteration))
        cells = [f"{label}{mark}", *(_cell(r, s, m) for s, m in cols)]
        lines.append(f"| {' | '.join(cells)} |")
    if chosen is not None:
        lines.append(f"\nselected on {SELECTION_SET} {select}: iteration {chosen.iteration}")
    return "\n".join(lines)


def before_after(records: Sequence[CheckpointResult], last: int) -> str:
    """Before and after RLEF, every set and metric (the whole curve: eval/curve.md)."""
    ends = [r for r in records if r.iteration in (0, last)]
    return curve_table(ends, select=None, labels={0: "before RLEF", last: f"after RLEF ({last})"})


def numbers(record: CheckpointResult) -> str:
    """Every set's estimates in one line: `valid 1@3 28.7%, 10@12 65.0%; test ...`."""
    return "; ".join(
        f"{name} " + ", ".join(f"{m} {100 * row.mean:.1f}%" for m, row in s.metrics.items())
        for name, s in record.sets.items()
    )


def summary(records: Sequence[CheckpointResult], select: str) -> str:
    """One line for a terminal: the selected checkpoint and its numbers on every set."""
    chosen = best(records, select)
    if chosen is None:
        return "best checkpoint: none evaluated yet"
    return (
        f"best checkpoint on {SELECTION_SET} {select}: iteration {chosen.iteration} "
        f"({numbers(chosen)})"
    )
