"""The warm start's demonstrations: what the policy sees before RL."""

from __future__ import annotations

from rlef_hpc.data import synthetic
from rlef_hpc.episodes import Templates
from rlef_hpc.models.tokenizer import build_tokenizer
from rlef_hpc.sandbox import Executor
from rlef_hpc.train.warmstart import demonstrations, near_miss, repair_demonstrations


def test_near_miss_demonstrations_change_one_constant():
    assert near_miss("x = int(input())\nprint(x % 8)\n") == "x = int(input())\nprint(x % 9)\n"
    assert near_miss("print(input().count('j'))\n") == "print(input().count('k'))\n"
    assert near_miss("print(input().count('z'))\n") == "print(input().count('a'))\n"
    assert near_miss("input()\nprint('F')\n") == "input()\nprint('G')\n"
    assert near_miss("print(input().lower())\n") is None  # nothing to get almost right


def test_a_secret_letter_is_learnt_from_the_feedback_only(executor: Executor):
    """The secret family's answer is nowhere in the first prompt; the repair demonstration
    shows it quoted in the real feedback to the near miss, and trains on the answer after."""
    problems = synthetic.generate(30, "train", seed=0, curriculum="feedback")
    problems = [p for p in problems if p.tags[1] == "secret"]
    problem = problems[0]
    letter = problem.private_tests[0].output.strip()
    templates = Templates()
    corpus = [p.description + p.reference().source for p in problems] + [templates.wrong_answer]
    tokenizer = build_tokenizer(corpus * 4, 400)

    [(tokens, start)] = demonstrations([problem], tokenizer, templates, "python")
    assert f"'{letter}'" not in tokenizer.decode(tokens[:start])
    [(tokens, start)] = repair_demonstrations([problem], tokenizer, templates, "python", executor)
    prompt, answer = tokenizer.decode(tokens[:start]), tokenizer.decode(tokens[start:])
    guess = near_miss(problem.reference().source)
    guessed = guess.split("'")[1]
    assert f"Expected output '{letter}' but got '{guessed}'" in prompt
    assert prompt.count("```python\n" + guess.rstrip()) == 1  # the first answer, not trained on
    assert answer == f"```python\n{problem.reference().source.rstrip()}\n```{tokenizer.eos_token}"
    # One token, the same in the feedback and in the answer: a copy.
    [token] = tokenizer.encode(letter, add_special_tokens=False)
    feedback = tokens[feedback_start(tokens[:start], tokenizer) :]
    assert token in tokens[start:] and token in feedback


def feedback_start(tokens: list[int], tokenizer) -> int:
    """Where the feedback message starts: after the first answer's end of turn."""
    eot = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    return [i for i, t in enumerate(tokens) if t == eot][1]
