"""rlef-eval: n@k solve rates of a policy on a problem file, turns counted as samples.

The problem file is CodeContests (JSON lines or parquet, or a directory with --split), or
function problems in the HumanEval+/MBPP+ style (JSON lines with an entry_point).

    rlef-eval --problems valid.jsonl --model ./hf_model [--rollouts 20] [--temperature 0.2]
    rlef-eval --problems valid.jsonl --answers answers.jsonl

--model generates with vLLM; --answers replays pre-generated rollouts, one JSON line each:
{"problem": NAME, "turns": [response 1, response 2, ...]}. Prints the table; with --out, also
writes report.json, report.md, trajectories.jsonl and solve_rate.png there.

--feedback real,random,none runs the same episodes once per mode of feedback after a failure
(real: the failing public tests; random: another problem's feedback; none: the message without
the failing tests), each from the same sampling seed, a report each (in --out/MODE/). Every
report also has the edit statistics between consecutive turns and the n@k-against-k curve (see
rlef_hpc/eval/analysis.py); tools/feedback_analysis.py compares two policies that way.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlef_hpc import logs, runtime
from rlef_hpc.data.bundled import BUNDLED
from rlef_hpc.jsonl import JsonLinesError, iter_jsonl

if TYPE_CHECKING:
    from rlef_hpc.eval.protocol import MetricSpec


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlef-eval", description=__doc__.splitlines()[0])
    p.add_argument(
        "--problems",
        type=Path,
        default=BUNDLED,
        help="CodeContests file or directory (default: the bundled set)",
    )
    p.add_argument("--split", choices=("train", "valid", "test"), help="split, for a directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face model directory, generated with vLLM")
    source.add_argument("--answers", type=Path, help="JSON lines of pre-generated rollouts")
    p.add_argument("--rollouts", type=int, default=10, help="rollouts per problem (--model)")
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--language", choices=("python", "cpp"), default="python")
    p.add_argument(
        "--metrics", default="1@3,10@100", help="comma-separated n@k (default 1@3,10@100)"
    )
    p.add_argument("--templates", type=Path, help="YAML file overriding prompt/feedback templates")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--limit", type=int, help="evaluate only the first N problems")
    p.add_argument("--workers", type=int, default=2, help="sandbox workers")
    p.add_argument(
        "--tensor-parallel", type=int, default=1, help="GPUs of the vLLM engine (--model)"
    )
    p.add_argument(
        "--feedback",
        default="real",
        help="comma-separated feedback modes after a failure: real, random, none (default real)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="generate only once every execution has finished, so that samples do not depend "
        "on timing (always on with several --feedback modes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="directory for report.json, trajectories, the plot")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show vLLM's and the other libraries' logs live (else in --out/logs/eval.log, or "
        "a file in the temporary directory, named on stderr)",
    )
    return p


def read_answers(path: Path, names: set[str]) -> dict[str, list[list[str]]]:
    scripts: dict[str, list[list[str]]] = collections.defaultdict(list)
    try:
        records = list(iter_jsonl(path))
    except JsonLinesError as e:
        raise UsageError(str(e)) from None
    for where, record in records:
        turns = record.get("turns") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise UsageError(f"{where}: field 'turns' must be a non-empty list of strings")
        if record.get("problem") not in names:
            raise UsageError(f"{where}: unknown problem {record.get('problem')!r}")
        scripts[record["problem"]].append(turns)
    if not scripts:
        raise UsageError(f"{path}: no answers")
    return dict(scripts)


def main(argv: list[str] | None = None) -> int:
    runtime.setup()  # before anything loads torch
    parser = build_parser()
    args = parser.parse_args(argv)
    from rlef_hpc.data.codecontests import ProblemFormatError, load_problems
    from rlef_hpc.data.functions import load_function_problems, to_problems
    from rlef_hpc.episodes import Templates
    from rlef_hpc.eval.analysis import parse_feedback_modes
    from rlef_hpc.eval.protocol import MetricSpec

    try:
        metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()]
        if not metric_names:
            raise UsageError("--metrics: no metric given")
        metrics = [MetricSpec(m, args.temperature, args.top_p) for m in metric_names]
        args.feedback = parse_feedback_modes(args.feedback)
        if args.rollouts < 1 or args.max_turns < 1:
            raise UsageError("--rollouts and --max-turns must be positive")
        # Checked before the sandbox and vLLM start: a typo should cost one line, not a minute.
        if args.model and not Path(args.model).is_dir():
            raise UsageError(f"--model {args.model}: no such model directory")
        if args.model and not (Path(args.model) / "config.json").is_file():
            raise UsageError(f"--model {args.model}: not a Hugging Face model (no config.json)")
        functions = None
        if is_function_file(args.problems):  # HumanEval+/MBPP+ style: the transfer evaluation
            functions = load_function_problems(args.problems)[: args.limit]
            names = {f.task_id for f in functions}
        else:
            problems = load_problems(args.problems, args.split)[: args.limit]
            names = {p.name for p in problems}
        if not names:
            raise UsageError(f"no problems in {args.problems}")
        scripts = read_answers(args.answers, names) if args.answers else None
        args.templates = Templates.from_yaml(args.templates) if args.templates else Templates()
    except (UsageError, ValueError, OSError, ProblemFormatError) as e:
        parser.exit(2, f"rlef-eval: error: {e}\n")
    if args.model:  # vLLM's engine logs, warnings: the table is what the terminal is for
        if args.out:
            logs.setup(args.out / "logs", "eval", args.verbose)
        else:
            path = logs.setup(Path(tempfile.gettempdir()), f"rlef-eval-{os.getpid()}", args.verbose)
            print(f"rlef-eval: library logs in {path}", file=sys.stderr)
    from rlef_hpc.sandbox import Executor

    with Executor(workers=args.workers) as executor:
        if functions is not None:
            problems = to_problems(functions, executor)  # expected outputs, in the sandbox
        results = run(args, problems, scripts, metrics, executor)
    for mode, result in results.items():
        if len(results) > 1:
            print(f"\n## {mode} feedback\n")
        print(result.report.table())
    if args.out:
        from rlef_hpc.eval.policy import write_outputs

        write_outputs(args.out, results, args.max_turns)
    return 0


def is_function_file(path: Path) -> bool:
    """A JSON-lines file whose first record names an entry point holds function problems."""
    if not path.is_file() or path.suffix != ".jsonl":
        return False
    first = next(iter_jsonl(path), (None, None))[1]
    return isinstance(first, dict) and "entry_point" in first


def run(
    args: argparse.Namespace,
    problems: list[Any],
    scripts: Any,
    metrics: list[MetricSpec],
    executor: Any,
) -> dict[str, Any]:
    """{feedback mode: its DrawResult} of the model or the replayed answers: the evaluator on
    one set, every metric sampled alike, once per feedback mode from the same seeds (the modes
    differ in what follows a failure, not in the draw of first answers)."""
    from dataclasses import replace

    from rlef_hpc.episodes import EpisodeConfig, ScriptedPolicy
    from rlef_hpc.eval.evaluator import episode_generate, evaluate

    config = EpisodeConfig(
        max_turns=args.max_turns,
        language=args.language,
        templates=args.templates,
        # Modes compared must differ only in their feedback, not in batches formed by timing.
        deterministic=args.deterministic or len(args.feedback) > 1,
    )
    if scripts is None:
        from rlef_hpc.eval.policy import ModelEvaluator
        from rlef_hpc.rollout.config import RolloutConfig

        rollout = RolloutConfig(
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            tensor_parallel=args.tensor_parallel,
        )
        model = ModelEvaluator(rollout, config, executor, args.seed)
        model.load(args.model)
        sets, rollouts = {"problems": problems}, args.rollouts
        generator = model.generator
    else:
        from rlef_hpc.models.tokenizer import build_tokenizer

        # Replaying text needs a tokenizer only to keep the conversation: any will do.
        corpus = [t for rollouts in scripts.values() for r in rollouts for t in r]
        tokenizer = build_tokenizer(corpus + [p.description for p in problems], vocab_size=400)
        # One rollout per scripted answer: the set holds each problem once per answer.
        sets = {"problems": [p for p in problems if p.name in scripts for _ in scripts[p.name]]}
        rollouts = 1

        def replay(temperature: float, top_p: float) -> Any:
            # A fresh replay per draw: the policy counts the rollouts it has handed out.
            return ScriptedPolicy(
                tokenizer, problems, scripts, args.templates, args.language, strict=False
            )

        def generator(mode_config: EpisodeConfig) -> Any:
            return episode_generate(tokenizer, executor, replay, mode_config, args.seed)

    results = {}
    for mode in args.feedback:
        mode_config = replace(config, feedback=mode)
        [result] = evaluate(
            generator(mode_config), sets, metrics, rollouts, args.max_turns, seed=args.seed,
            feedback=mode,
        )  # fmt: skip
        results[mode] = result
    return results


if __name__ == "__main__":
    sys.exit(main())
