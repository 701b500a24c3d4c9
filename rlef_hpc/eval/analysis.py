"""Does the policy use the feedback? How answers change between turns, and how solve rate
grows with the turn and sample budgets (the paper's inference-time analysis).

Edit statistics, per pair of consecutive turns (t, t+1) of the episodes that reached turn t+1
(turn t then failed the public tests, or had no valid code: that is why there is a turn t+1):
- `changed`: share of pairs whose extracted code differs (an answer without code counts as
  empty code, so two answers without code are "unchanged").
- `distance`: mean normalised edit distance between the two codes: the Levenshtein distance on
  *characters* (insertions, deletions and substitutions, each costing 1) divided by the
  length of the longer code; 0 for the same code, 1 for codes with nothing in common at any
  position (or one of them empty). Characters rather than tokens: every policy is measured
  the same way, whatever its tokenizer.
- `fixed`: share of pairs whose turn t+1 passes the public tests (a failing attempt followed
  by a passing one; the episode ends there).
The yardstick for "targeted edit or fresh resample": `resample_distance`, the same distance
between the first answers of two rollouts of the same problem (rollouts 1 and 2, 3 and 4, ...).

Budgets: solve rate against turns (`solved_by_turn`: an episode cut after t turns is solved
exactly when it was solved at turn t or before) and against samples (n@k for every k that
whole rollouts buy, turns counted as samples: `sample_curve`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlef_hpc.data.trajectory import Trajectory
from rlef_hpc.eval.metrics import RolloutOutcome, n_at_k

FEEDBACK_MODES = ("real", "random", "none")
SAMPLE_CURVE_N = (1, 10)  # the n of the n@k curves: the paper's 1@k and 10@k


def parse_feedback_modes(text: str) -> list[str]:
    """'real,random' -> ['real', 'random']; unknown or repeated modes are errors."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for m in modes:
        if m not in FEEDBACK_MODES:
            raise ValueError(f"feedback {m!r} is not one of {', '.join(FEEDBACK_MODES)}")
    if not modes or len(set(modes)) != len(modes):
        raise ValueError(f"feedback {text!r}: give distinct modes among {FEEDBACK_MODES}")
    return modes


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Edit distance between two sequences: insertions, deletions, substitutions, cost 1."""
    # A common prefix and suffix cost nothing; between turns they are most of the code (a
    # targeted edit), so trimming them first keeps the quadratic part small.
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    a, b = a[start : len(a) - end], b[start : len(b) - end]
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def normalised_edit_distance(a: str | None, b: str | None) -> float:
    """Levenshtein distance of the characters of two codes over the longer one's length (in
    [0, 1]); None (no code) is the empty code, and two empty codes are at distance 0."""
    a, b = a or "", b or ""
    longest = max(len(a), len(b))
    return levenshtein(a, b) / longest if longest else 0.0


@dataclass(frozen=True)
class EditRow:
    """How the answers of turn `turn` changed at turn `turn + 1`."""

    turn: int
    pairs: int
    changed: float
    distance: float
    fixed: float


def edit_statistics(trajectories: Iterable[Trajectory], max_turns: int) -> list[EditRow]:
    """One row per turn pair (1->2, ..., max_turns-1 -> max_turns) that some episode reached."""
    rows = []
    trajectories = list(trajectories)
    for t in range(1, max_turns):
        pairs = [(e.turns[t - 1], e.turns[t]) for e in trajectories if len(e.turns) > t]
        if not pairs:
            continue
        rows.append(
            EditRow(
                turn=t,
                pairs=len(pairs),
                changed=sum((a.code or "") != (b.code or "") for a, b in pairs) / len(pairs),
                distance=sum(normalised_edit_distance(a.code, b.code) for a, b in pairs)
                / len(pairs),
                fixed=sum(b.passed_public for _, b in pairs) / len(pairs),
            )
        )
    return rows


def resample_distance(trajectories: Iterable[Trajectory]) -> float | None:
    """Mean normalised edit distance between the first answers of two rollouts of the same
    problem (rollouts paired in order: 1 with 2, 3 with 4, ...); None without such pairs."""
    first: dict[str, list[str | None]] = {}
    for e in trajectories:
        first.setdefault(e.problem, []).append(e.turns[0].code)
    distances = [
        normalised_edit_distance(codes[i], codes[i + 1])
        for codes in first.values()
        for i in range(0, len(codes) - 1, 2)
    ]
    return sum(distances) / len(distances) if distances else None


def sample_curve(
    grouped: Mapping[str, Sequence[RolloutOutcome]], n: int, max_turns: int
) -> list[tuple[int, float]]:
    """(k, mean n@k over problems) for k = max_turns, 2 max_turns, ... up to the budget the
    problem with the fewest rollouts can pay: solve rate against samples, turns counted."""
    fewest = min(len(o) for o in grouped.values())
    return [
        (k, sum(n_at_k(o, n, k, max_turns) for o in grouped.values()) / len(grouped))
        for k in (max_turns * m for m in range(1, fewest + 1))
    ]


def _style(label: str, labels: list[str]) -> dict[str, Any]:
    """A colour per policy (the label's part before ' / '), a line style per feedback mode."""
    policies = list(dict.fromkeys(x.split(" / ")[0] for x in labels))
    mode = label.split(" / ")[1] if " / " in label else "real"
    dashes = {"real": "-", "random": "--", "none": ":"}
    return {"color": f"C{policies.index(label.split(' / ')[0])}", "linestyle": dashes[mode]}


def plot_budgets(reports: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Solve rate against turns (left) and 1@k against samples k (right), one line per report
    (an EvalReport or its JSON), labelled "POLICY / FEEDBACK" or just "POLICY"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_turn, by_sample) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    labels = list(reports)
    for label, report in reports.items():
        r = report if isinstance(report, dict) else report.to_json()
        style = _style(label, labels)
        turns = range(1, len(r["solved_by_turn"]) + 1)
        by_turn.plot(
            turns, [100 * v for v in r["solved_by_turn"]], marker="o", label=label, **style
        )
        curve = r["sample_curves"]["1"]
        by_sample.plot(
            [k for k, _ in curve], [100 * v for _, v in curve], marker=".", label=label, **style
        )
    by_turn.set_xlabel("turns per rollout (one rollout)")
    by_turn.set_xticks(list(turns))
    by_sample.set_xlabel("sample budget k (turns counted as samples)")
    by_turn.set_ylabel("solve rate (%)")
    by_sample.set_ylabel("1@k (%)")
    for ax in (by_turn, by_sample):
        ax.grid(alpha=0.3)
    by_sample.legend(fontsize=7, handlelength=3)  # long enough to show the dashes
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def comparison_tables(reports: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
    """Markdown tables comparing policies across feedback modes, from report JSONs keyed by
    (policy, mode): the headline metric, its gain from the first policy to the last, the edit
    statistics, and the budget curves with the real feedback."""
    policies = list(dict.fromkeys(p for p, _ in reports))
    modes = list(dict.fromkeys(m for _, m in reports))
    first, last = policies[0], policies[-1]
    if not all(r["rows"] for r in reports.values()):
        raise ValueError("no n@k was estimated: pass rlef-eval --metrics the rollouts support")
    metric = reports[first, modes[0]]["rows"][0]["name"]

    def row(p: str, m: str) -> dict[str, Any]:
        return reports[p, m]["rows"][0]

    head = [f"{p} {metric}" for p in policies]
    turns = len(reports[first, modes[0]]["solved_by_turn"])
    lines = [
        f"| feedback | {' | '.join(head)} | gain ({first} -> {last}) "
        f"| solved by turn {' / '.join(map(str, range(1, turns + 1)))} |",
        "|---" * (len(policies) + 3) + "|",
    ]
    for m in modes:
        cells = [
            f"{_pct(row(p, m)['mean'])} [{100 * row(p, m)['low']:.1f}, "
            f"{100 * row(p, m)['high']:.1f}]"
            for p in policies
        ]
        gain = 100 * (row(last, m)["mean"] - row(first, m)["mean"])
        by_turn = ", ".join(
            f"{p}: {' / '.join(_pct(v) for v in reports[p, m]['solved_by_turn'])}" for p in policies
        )
        lines.append(f"| {m} | {' | '.join(cells)} | {gain:+.1f} points | {by_turn} |")

    lines += [
        "",
        "| policy | feedback | turns | pairs | code changed | edit distance | fixed "
        "| resample distance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in policies:
        for m in modes:
            r = reports[p, m]
            resample = r.get("resample_distance")
            resample_cell = "-" if resample is None else f"{resample:.3f}"
            if not r["edits"]:
                lines.append(f"| {p} | {m} | - | 0 | - | - | - | {resample_cell} |")
            for e in r["edits"]:
                lines.append(
                    f"| {p} | {m} | {e['turn']}->{e['turn'] + 1} | {e['pairs']} "
                    f"| {_pct(e['changed'])} | {e['distance']:.3f} | {_pct(e['fixed'])} "
                    f"| {resample_cell} |"
                )

    budget_mode = "real" if "real" in modes else modes[0]
    lines += _table_head(f"solve rate against turns ({budget_mode} feedback)", ["turns", *policies])
    for t in range(turns):
        cells = [_pct(reports[p, budget_mode]["solved_by_turn"][t]) for p in policies]
        lines.append(f"| {t + 1} | {' | '.join(cells)} |")
    curves = {
        (p, n): dict(map(tuple, reports[p, budget_mode]["sample_curves"][str(n)]))
        for p in policies
        for n in SAMPLE_CURVE_N
    }
    budgets = sorted(set.intersection(*(set(c) for c in curves.values())))
    names = [f"{p} {n}@k" for n in SAMPLE_CURVE_N for p in policies]
    lines += _table_head(
        f"solve rate against samples k ({budget_mode} feedback, turns counted as samples)",
        ["k", *names],
    )
    for k in budgets:
        cells = [_pct(curves[p, n][k]) for n in SAMPLE_CURVE_N for p in policies]
        lines.append(f"| {k} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _table_head(title: str, columns: list[str]) -> list[str]:
    """A titled markdown table's first lines."""
    return ["", title, "", f"| {' | '.join(columns)} |", "|---" * len(columns) + "|"]
