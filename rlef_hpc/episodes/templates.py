"""The paper's prompt and feedback wording, as data (overridable per run), and how long inputs,
outputs and tracebacks are cut in feedback.

Truncation (the paper leaves it open): a text longer than its budget keeps its first and last
parts, joined by a marker naming what was left out, e.g. "12345...(980 characters omitted)...
6789". Tracebacks keep their *last* lines, where the exception is. Everything is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from rlef_hpc.data.problem import Problem
from rlef_hpc.sandbox import TestCase, TestResult, Verdict

LANGUAGE_NAMES = {"python": "Python", "cpp": "C++"}
FENCE_TAGS = {"python": "python", "cpp": "cpp"}


@dataclass(frozen=True)
class Templates:
    """The messages of an episode (the paper's wording; ${...} fields are filled in)."""

    initial: str = (
        "Provide a ${language} solution for the following competitive programming question: "
        "${problem}.\nYour code should be enclosed in triple backticks like so: "
        "```${fence} YOUR CODE HERE ```. Use the backticks for your code only."
    )
    # The first message of a function problem (HumanEval/MBPP style: its tests call the
    # function, they give no stdin): the signature and docstring to complete (our wording; the
    # paper poses CodeContests' stdin problems only).
    initial_function: str = (
        "Complete the following ${language} function. Write the whole function, its signature "
        "as given:\n```${fence}\n${problem}\n```\nYour code should be enclosed in triple "
        "backticks like so: ```${fence} YOUR CODE HERE ```. Use the backticks for your code only."
    )
    feedback_header: str = "Your code failed the following tests:"
    wrong_answer: str = (
        "- input '${input}' failed: Expected output '${expected}' but got '${observed}'"
    )
    runtime_error: str = "- input '${input}' failed: ${stacktrace}"
    time_limit: str = "- input '${input}' failed: Execution took too long."
    memory_limit: str = "- input '${input}' failed: Out of memory."
    feedback_footer: str = (
        "Give it another try.\nYour code should be enclosed in triple backticks like so: "
        "```${fence} YOUR CODE HERE ```. Use the backticks for your code only."
    )
    # After an answer without any code block (our wording: the paper has none for this case).
    no_code: str = (
        "Your answer did not contain any code.\nYour code should be enclosed in triple backticks "
        "like so: ```${fence} YOUR CODE HERE ```. Use the backticks for your code only."
    )
    # Budgets, in characters, for what feedback quotes.
    max_input_chars: int = 400
    max_output_chars: int = 400
    max_traceback_lines: int = 20
    max_traceback_chars: int = 1200
    max_failures_shown: int = 10

    @classmethod
    def from_dict(cls, overrides: dict[str, Any]) -> Templates:
        """Templates with some fields replaced; unknown names are errors that list the known."""
        known = {f.name: f.type for f in fields(cls)}
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"unknown template '{key}'; expected one of {', '.join(known)}")
            expected = int if known[key] == "int" else str
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ValueError(f"template '{key}' must be {expected.__name__}, got {value!r}")
        return replace(cls(), **overrides)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Templates:
        """Templates from a YAML mapping of field names to replacements."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of template names to texts")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def fill(template: str, **values: str) -> str:
    # ${name} placeholders, replaced once and in one pass: a value containing "${...}" (a
    # program's output, say) is never expanded again.
    out, i = [], 0
    while (start := template.find("${", i)) >= 0:
        end = template.index("}", start)
        out.append(template[i:start])
        out.append(values[template[start + 2 : end]])
        i = end + 1
    out.append(template[i:])
    return "".join(out)


def truncate(text: str, budget: int) -> str:
    """`text` itself if it fits, else its head and tail around a marker; at most ~budget long."""
    if len(text) <= budget:
        return text
    keep = max(budget - 40, 2)
    head, tail = keep - keep // 2, keep // 2
    omitted = len(text) - head - tail
    return f"{text[:head]}...({omitted} characters omitted)...{text[len(text) - tail :]}"


def truncate_traceback(text: str, max_lines: int, max_chars: int) -> str:
    lines = text.rstrip("\n").split("\n")
    if len(lines) > max_lines:
        lines = [f"...({len(lines) - max_lines} lines omitted)...", *lines[-max_lines:]]
    text = "\n".join(lines)
    if len(text) > max_chars:
        text = f"...({len(text) - max_chars} characters omitted)..." + text[-max_chars:]
    return text


def _quote(text: str | bytes | None, budget: int) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return truncate((text or "").strip(), budget)


def initial_prompt(templates: Templates, problem: Problem, language: str) -> str:
    """The episode's first message, by the problem's kind: a function to complete (a problem
    with a harness that calls it: rlef_hpc.data.functions) or a stdin program."""
    template = templates.initial_function if problem.harness else templates.initial
    return fill(
        template,
        language=LANGUAGE_NAMES[language],
        problem=problem.description.strip(),
        fence=FENCE_TAGS[language],
    )


def failure_line(templates: Templates, test_input: str, expected: str | None, r: TestResult) -> str:
    t = templates
    quoted = _quote(test_input, t.max_input_chars)
    if r.verdict is Verdict.TIME_LIMIT:
        return fill(t.time_limit, input=quoted)
    if r.verdict is Verdict.MEMORY_LIMIT:
        return fill(t.memory_limit, input=quoted)
    if r.verdict is Verdict.WRONG_ANSWER:
        return fill(
            t.wrong_answer,
            input=quoted,
            expected=_quote(expected, t.max_output_chars),
            observed=_quote(r.output, t.max_output_chars),
        )
    # Runtime errors, and the rarer kinds, all read as what the program printed to stderr.
    trace = r.stderr.strip() or {
        Verdict.OUTPUT_LIMIT: "Output limit exceeded.",
        Verdict.SANDBOX_VIOLATION: "The program attempted an operation that is not allowed.",
        Verdict.COMPILE_ERROR: "Compilation failed.",
    }.get(r.verdict, f"Exited with status {r.exit_code}.")
    trace = truncate_traceback(trace, t.max_traceback_lines, t.max_traceback_chars)
    return fill(t.runtime_error, input=quoted, stacktrace=trace)


def public_feedback(
    templates: Templates, language: str, tests: Sequence[TestCase], results: Sequence[TestResult]
) -> str:
    """The user message after a turn whose code failed some of the public `tests`."""
    failures = [(t.input, t.output, r) for t, r in zip(tests, results, strict=True) if not r.passed]
    if failures and failures[0][2].verdict is Verdict.COMPILE_ERROR:
        failures = failures[:1]  # the same compiler message for every test
    return feedback_message(templates, language, failures)


def feedback_message(
    templates: Templates,
    language: str,
    failures: list[tuple[str, str | None, TestResult]],
) -> str:
    """The user message after a turn whose code failed public tests."""
    shown = failures[: templates.max_failures_shown]
    lines = [templates.feedback_header]
    lines += [failure_line(templates, i, e, r) for i, e, r in shown]
    if len(failures) > len(shown):
        lines.append(f"- ...and {len(failures) - len(shown)} more failing tests.")
    lines.append(fill(templates.feedback_footer, fence=FENCE_TAGS[language]))
    return "\n".join(lines)
