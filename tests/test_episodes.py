"""Episodes with scripted policies: turn logic, rewards, feedback wording, token spans."""

from __future__ import annotations

import pytest

from rlef_hpc.data import Problem
from rlef_hpc.episodes import (
    EpisodeConfig,
    EpisodeRunner,
    Generation,
    ScriptedPolicy,
    Templates,
    extract_code,
    truncate,
)
from rlef_hpc.models.tokenizer import build_tokenizer
from rlef_hpc.sandbox import TestCase

SUM = Problem(
    name="sum",
    description="Read two integers a and b and print a + b",
    public_tests=[TestCase("1 2\n", "3\n"), TestCase("5 5\n", "10\n")],
    private_tests=[TestCase("100 200\n", "300\n"), TestCase("-4 4\n", "0\n")],
    time_limit_s=1.0,
    memory_limit_bytes=256 << 20,
)
RIGHT = "Here it is:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
WRONG = "```python\na, b = map(int, input().split())\nprint(a - b)\n```"
NO_CODE = "I am not sure how to solve this."
SYNTAX = "```python\nprint(\n```"
HARDCODED = "```python\nprint({'1 2': 3, '5 5': 10}[input().strip()])\n```"
LOOP = "```python\nwhile True:\n    pass\n```"
CRASH = "```python\ndef f(x):\n    return 10 // x\nprint(f(0))\n```"
HOG = "```python\nx = bytearray(1 << 30)\n```"


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [
        RIGHT,
        WRONG,
        NO_CODE,
        SUM.description,
        Templates().initial,
        Templates().feedback_footer,
    ]
    return build_tokenizer(corpus * 20, vocab_size=400)


def run(tokenizer, executor, rollouts, problem=SUM, **config):
    language = config.get("language", "python")
    policy = ScriptedPolicy(tokenizer, [problem], {problem.name: rollouts}, language=language)
    runner = EpisodeRunner(tokenizer, executor, policy, EpisodeConfig(**config))
    return runner.run([problem] * len(rollouts))


def test_pass_at_turn_one(tokenizer, executor):
    [t] = run(tokenizer, executor, [[RIGHT]])
    assert t.success and len(t.turns) == 1
    assert [turn.reward for turn in t.turns] == [1.0]
    assert t.turns[0].public_verdicts == ["OK", "OK"] and t.turns[0].feedback is None


def test_fail_then_fix(tokenizer, executor):
    [t] = run(tokenizer, executor, [[WRONG, RIGHT]])
    assert t.success and [turn.reward for turn in t.turns] == [0.0, 1.0]
    assert t.turns[0].feedback == (
        "Your code failed the following tests:\n"
        "- input '1 2' failed: Expected output '3' but got '-1'\n"
        "- input '5 5' failed: Expected output '10' but got '0'\n"
        "Give it another try.\nYour code should be enclosed in triple backticks like so: "
        "```python YOUR CODE HERE ```. Use the backticks for your code only."
    )


def test_invalid_code_then_valid(tokenizer, executor):
    [t] = run(tokenizer, executor, [[NO_CODE, RIGHT]])
    assert t.success
    assert [turn.reward for turn in t.turns] == [-0.2, 1.0]
    assert t.total_reward == pytest.approx(0.8)
    assert not t.turns[0].valid and t.turns[0].code is None
    assert t.turns[0].feedback.startswith("Your answer did not contain any code.")


def test_all_turns_invalid(tokenizer, executor):
    [t] = run(tokenizer, executor, [[NO_CODE, SYNTAX, NO_CODE]])
    assert not t.success and len(t.turns) == 3
    assert [turn.reward for turn in t.turns] == pytest.approx([-0.2, -0.2, -1.2])
    assert t.total_reward == pytest.approx(-1.6)
    assert t.turns[1].public_verdicts == ["COMPILE_ERROR", "COMPILE_ERROR"]
    assert "SyntaxError" in t.turns[1].feedback
    assert t.turns[1].feedback.count("- input") == 1  # one compiler message, not one per test


def test_public_pass_private_fail(tokenizer, executor):
    [t] = run(tokenizer, executor, [[HARDCODED, RIGHT]])
    assert len(t.turns) == 1  # public tests passed: the episode stops there
    assert t.turns[0].passed_public and not t.success
    assert t.turns[0].reward == -1.0


def test_timeouts_errors_and_memory_in_the_papers_wording(tokenizer, executor):
    [t] = run(tokenizer, executor, [[LOOP, CRASH, HOG]])
    assert not t.success and [turn.reward for turn in t.turns] == [0.0, 0.0, -1.0]
    assert "- input '1 2' failed: Execution took too long." in t.turns[0].feedback
    crash = t.turns[1].feedback
    assert "- input '1 2' failed: Traceback (most recent call last):" in crash
    assert 'File "solution.py", line 3, in <module>' in crash
    assert crash.count("ZeroDivisionError: integer division or modulo by zero") == 2
    assert t.turns[2].public_verdicts == ["MEMORY_LIMIT", "MEMORY_LIMIT"]
    assert t.turns[2].feedback is None  # last turn: no feedback follows


def test_memory_feedback(tokenizer, executor):
    [t] = run(tokenizer, executor, [[HOG, RIGHT]])
    assert "- input '1 2' failed: Out of memory." in t.turns[0].feedback


def test_token_spans_are_exact(tokenizer, executor):
    [t] = run(tokenizer, executor, [[WRONG, NO_CODE, RIGHT]])
    eot = tokenizer.eos_token_id
    previous_end = 0
    for turn, response in zip(t.turns, [WRONG, NO_CODE, RIGHT], strict=True):
        assert turn.prompt_start == previous_end
        assert turn.prompt_start < turn.prompt_end < turn.response_end
        sampled = tokenizer.encode(response, add_special_tokens=False) + [eot]
        assert t.tokens[turn.prompt_end : turn.response_end] == sampled
        assert turn.behaviour_logprobs == [-0.5] * len(sampled)
        assert turn.value_index == turn.prompt_end - 1
        # The value is read at the last token of the assistant header: the prompt's end.
        assert tokenizer.decode(t.tokens[: turn.prompt_end]).endswith(
            "assistant<|end_header_id|>\n\n"
        )
        previous_end = turn.response_end
    assert previous_end == len(t.tokens)
    mask = t.response_mask()
    assert sum(mask) == sum(turn.response_end - turn.prompt_end for turn in t.turns)
    rendered = tokenizer.apply_chat_template(t.messages, tokenize=False)
    assert tokenizer.decode(t.tokens) == rendered  # re-tokenises to the same text


def test_response_cut_short_is_closed_in_the_next_prompt(tokenizer, executor):
    eot = tokenizer.eos_token_id

    def truncated(prompts):
        # Never samples end-of-turn: as if every answer hit the token limit.
        tokens = tokenizer.encode(WRONG, add_special_tokens=False)
        return [Generation(tokens, [-1.0] * len(tokens)) for _ in prompts]

    runner = EpisodeRunner(tokenizer, executor, truncated, EpisodeConfig(max_turns=2))
    [t] = runner.run([SUM])
    first, second = t.turns
    assert t.tokens[first.response_end] == eot  # closed as part of the next prompt
    assert second.prompt_start == first.response_end and eot not in t.tokens[second.prompt_end :]


def test_many_episodes_at_once_keep_their_own_scripts(tokenizer, executor):
    rollouts = [[RIGHT], [WRONG, RIGHT], [NO_CODE, NO_CODE, NO_CODE], [WRONG, WRONG, WRONG]] * 3
    # The script tells rollouts that share a first answer apart by the order their second
    # turns are asked for: deterministic batching keeps that order the episodes' own.
    trajectories = run(tokenizer, executor, rollouts, generation_batch=5, deterministic=True)
    assert [len(t.turns) for t in trajectories] == [1, 2, 3, 3] * 3
    assert [t.success for t in trajectories] == [True, True, False, False] * 3


def test_single_turn_config(tokenizer, executor):
    [t] = run(tokenizer, executor, [[WRONG, RIGHT]], max_turns=1)
    assert len(t.turns) == 1 and not t.success and t.turns[0].reward == -1.0


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ("```python\nprint(1)\n```", "print(1)\n"),
        ("```py\nprint(1)\n```\nand\n```python\nprint(2)\n```", "print(2)\n"),  # last one wins
        ("```\nprint(3)\n```", "print(3)\n"),  # untagged
        ("```cpp\nint main(){}\n```", None),  # another language is never taken
        ("```python\nprint(4)", "print(4)\n"),  # unterminated: runs to the end
        ("```python print(5) ```", "print(5)\n"),  # the instruction's one-line form
        ("```python\nx = 6\nprint(x)```", "x = 6\nprint(x)\n"),
        ("no code at all", None),
        ("```python\n\n```", None),
    ],
)
def test_code_extraction_rules(answer, code):
    assert extract_code(answer, "python") == code


def test_truncation_is_deterministic_and_marked():
    text = "".join(str(i % 10) for i in range(1000))
    cut = truncate(text, 100)
    assert cut == truncate(text, 100) and len(cut) <= 100
    assert cut.startswith(text[:30]) and cut.endswith(text[-30:])
    assert "characters omitted" in cut
    assert truncate("short", 100) == "short"


def test_template_overrides_name_the_bad_key():
    assert Templates.from_dict({"feedback_header": "Failed:"}).feedback_header == "Failed:"
    with pytest.raises(ValueError, match="unknown template 'feedbak_header'; expected one of"):
        Templates.from_dict({"feedbak_header": "x"})


CPP_RIGHT = (
    "```cpp\n#include <iostream>\n"
    "int main() { long long a, b; std::cin >> a >> b; std::cout << a + b << '\\n'; }\n```"
)
CPP_BROKEN = "```cpp\nint main() { return missing; }\n```"


def test_cpp_episode_compile_error_then_fix(tokenizer, executor):
    [t] = run(tokenizer, executor, [[CPP_BROKEN, CPP_RIGHT]], language="cpp")
    assert t.success and [turn.reward for turn in t.turns] == pytest.approx([-0.2, 1.0])
    assert not t.turns[0].valid and t.turns[0].public_verdicts == ["COMPILE_ERROR"] * 2
    assert "'missing' was not declared" in t.turns[0].feedback
    assert t.turns[0].feedback.endswith(
        "```cpp YOUR CODE HERE ```. Use the backticks for your code only."
    )
    assert t.messages[0]["content"].startswith("Provide a C++ solution for the following")


def test_generation_overlaps_execution(tokenizer, executor):
    """While one batch is generated, the code of the previous batch is running."""
    slow = "```python\nimport time\ntime.sleep(0.3)\nprint(sum(map(int, input().split())))\n```"
    in_flight_during_generate = []

    class CountingExecutor:
        def __init__(self):
            self.futures = []

        def submit(self, job):
            future = executor.submit(job)
            self.futures.append(future)
            return future

    counting = CountingExecutor()
    policy = ScriptedPolicy(tokenizer, [SUM], {SUM.name: [[slow]] * 4})

    def generate(prompts):
        in_flight_during_generate.append(sum(not f.done() for f in counting.futures))
        return policy(prompts)

    runner = EpisodeRunner(tokenizer, counting, generate, EpisodeConfig(generation_batch=1))
    trajectories = runner.run([SUM] * 4)
    assert all(t.success for t in trajectories)
    assert max(in_flight_during_generate[1:]) >= 1


def test_templates_from_yaml(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("feedback_header: 'These tests failed:'\nmax_input_chars: 50\n")
    t = Templates.from_yaml(path)
    assert t.feedback_header == "These tests failed:" and t.max_input_chars == 50
    path.write_text("max_input_chars: lots\n")
    with pytest.raises(ValueError, match="t.yaml: template 'max_input_chars' must be int"):
        Templates.from_yaml(path)


def test_random_feedback_ablation_gives_another_problems_feedback(tokenizer, executor):
    diff = Problem(
        name="diff",
        description="Read two integers a and b and print a - b",
        public_tests=[TestCase("7 2\n", "5\n"), TestCase("9 9\n", "0\n")],
        private_tests=[],
        time_limit_s=1.0,
        memory_limit_bytes=256 << 20,
    )
    scripts = {SUM.name: [[WRONG, WRONG]] * 2, diff.name: [[RIGHT, RIGHT]] * 2}
    policy = ScriptedPolicy(tokenizer, [SUM, diff], scripts)
    problems = [SUM, diff, SUM, diff]
    real = EpisodeRunner(
        tokenizer, executor, policy, EpisodeConfig(max_turns=2, deterministic=True)
    )
    shown = [t.turns[0].feedback for t in real.run(problems)]
    assert "input '1 2'" in shown[0] and "input '7 2'" in shown[1]  # each its own tests
    policy = ScriptedPolicy(tokenizer, [SUM, diff], scripts)
    config = EpisodeConfig(max_turns=2, deterministic=True, feedback="random")
    swapped = [
        t.turns[0].feedback
        for t in EpisodeRunner(tokenizer, executor, policy, config).run(problems)
    ]
    # Once feedback for the other problem exists, an episode is shown that instead.
    assert "input '7 2'" in swapped[2] and "input '1 2'" in swapped[3]


def test_each_problem_kind_is_posed_with_its_own_prompt(executor):
    """A function problem (its tests call the function) asks for the function, showing its
    signature and docstring; a stdin problem keeps the paper's prompt, word for word."""
    from rlef_hpc.data.functions import FunctionProblem, to_problems
    from rlef_hpc.episodes.templates import initial_prompt

    signature = 'def add(a: int, b: int) -> int:\n    """The sum of a and b."""\n'
    function = FunctionProblem("t/0", signature, "add", "    return a + b\n", [[1, 2]])
    [posed] = to_problems([function], executor)
    text = initial_prompt(Templates(), posed, "python")
    assert text.startswith("Complete the following Python function.")
    assert f"```python\n{signature.strip()}\n```" in text
    assert "competitive programming" not in text
    stdin = initial_prompt(Templates(), SUM, "python")
    assert stdin == (
        "Provide a Python solution for the following competitive programming question: "
        f"{SUM.description}.\nYour code should be enclosed in triple backticks like so: "
        "```python YOUR CODE HERE ```. Use the backticks for your code only."
    )
