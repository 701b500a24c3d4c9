"""The warm start: its demonstrations (what the policy sees before RL), and its updates under
tensor parallelism equal to those of one process."""

from __future__ import annotations

import pytest
import torch

from rlef_hpc.data import synthetic
from rlef_hpc.episodes import Templates
from rlef_hpc.models.tokenizer import build_tokenizer
from rlef_hpc.sandbox import Executor
from rlef_hpc.train.config import WarmStartConfig
from rlef_hpc.train.warmstart import demonstrations, lr_factor, near_miss, repair_demonstrations
from tests.helpers import script, torchrun

SCRIPT = script("warmstart_update")
# float32: the TP2 model sums its row-parallel partial products and the log-softmax over two
# shards, so it rounds differently from TP1; Adam carries that through the updates.
RTOL = 1e-4


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


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    """The same weights and demonstrations warm-started at TP1 and TP2
    (tests/scripts/warmstart_update.py)."""
    tmp = tmp_path_factory.mktemp("warmstart")
    init = tmp / "init.pt"
    torchrun(SCRIPT, 1, "--make-init", init)
    for tp in (1, 2):
        torchrun(SCRIPT, tp, "--tp", tp, "--init", init, "--out", tmp / f"tp{tp}.pt")
    return {tp: torch.load(tmp / f"tp{tp}.pt") for tp in (1, 2)} | {0: torch.load(init)}


@pytest.mark.multiprocess
def test_tensor_parallel_warm_start_matches_one_process(runs):
    tp1, tp2 = runs[1], runs[2]
    assert tp1["losses"][-1] < 0.95 * tp1["losses"][0]  # the updates do move the model
    torch.testing.assert_close(
        torch.tensor(tp2["losses"]), torch.tensor(tp1["losses"]), rtol=RTOL, atol=0
    )
    for name, weight in tp1["state"].items():
        assert not torch.equal(weight, runs[0][name]), name  # updated in place
        torch.testing.assert_close(tp2["state"][name], weight, rtol=RTOL, atol=1e-5)


@pytest.mark.multiprocess
def test_log_probs_without_the_tensor_parallel_group_would_differ(runs):
    """What the warm start computed before it used next_token_logprobs: the same as now at
    TP1, and at TP2 (each rank's vocabulary shard taken for the whole) far outside the
    tolerance above, so the comparison can fail."""
    tp1, tp2 = runs[1], runs[2]
    assert tp1["untargeted"] == pytest.approx(tp1["losses"][0], rel=1e-6)
    assert abs(tp2["untargeted"] - tp1["losses"][0]) > 100 * RTOL * tp1["losses"][0]


@pytest.mark.multiprocess
def test_the_output_layer_sees_only_the_answer_positions(runs):
    """The loss reads only the answer tokens' predictions, so only their hidden states go
    through the output layer (the first step's batch: its answer tokens, not all its
    positions), at any tensor parallelism; the loss is the same (the comparison above)."""
    for tp in (1, 2):
        assert len(runs[tp]["head_rows"]) == 8  # one forward per step
        assert runs[tp]["head_rows"][0] == runs[tp]["answer_tokens"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("ranks", [1, 2])  # 2: data-parallel, the held-out set split unevenly
def test_the_warm_start_keeps_the_weights_where_the_held_out_loss_was_lowest(tmp_path, ranks):
    """warmstart.select_every: looks every 2 of 8 steps and after the last; the model ends with
    the weights of the lowest look, whose held-out loss a plain forward of the final model
    gives again (every answer token over all ranks)."""
    init, out = tmp_path / "init.pt", tmp_path / "select.pt"
    torchrun(SCRIPT, 1, "--make-init", init)
    torchrun(SCRIPT, ranks, "--init", init, "--select", out)
    got = torch.load(out)
    steps = [step for step, _ in got["heldout"]]
    assert steps == [2, 4, 6, 8]
    losses = [loss for _, loss in got["heldout"]]
    assert got["kept"] == got["heldout"][losses.index(min(losses))]
    # not the last weights: theirs is further from the kept loss than the check below allows
    assert got["kept"][0] < 8 and losses[-1] > (1 + 1e-3) * got["kept"][1]
    assert got["final"] == pytest.approx(got["kept"][1], rel=1e-5)


def test_the_learning_rate_rises_over_the_warm_up_then_decays_to_a_tenth():
    """warmstart.warmup_steps (the demo's 40 of 400: with 10, its seed 3 ended at a loss of
    0.145 and a policy solving 1.8% of held-out problems)."""
    rises = [lr_factor(s, 400, 40) for s in (0, 19, 39)]
    assert rises == pytest.approx([1 / 40, 20 / 40 * (1 - 19 / 400), 1 - 39 / 400])
    assert lr_factor(0, 400) == pytest.approx(0.1)  # the default: 10 updates
    assert lr_factor(399, 400, 40) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmStartConfig(warmup_steps=0)
