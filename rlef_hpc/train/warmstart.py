"""Supervised warm start: next-token loss on reference solutions, as the episode's first turn
would present them, so that a policy built from scratch starts RL able to answer at all."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from rlef_hpc.data.problem import Problem
from rlef_hpc.episodes.conversation import Conversation
from rlef_hpc.episodes.templates import FENCE_TAGS, Templates, initial_prompt, public_feedback
from rlef_hpc.models.gpt import causal_mask, sequence_multiple
from rlef_hpc.progress import progress_bar
from rlef_hpc.rl.logprobs import next_token_logprobs, vocab_parallel_logprobs
from rlef_hpc.rl.optim import OptimConfig, make_trainable
from rlef_hpc.rl.passes import forward
from rlef_hpc.sandbox import Job

if TYPE_CHECKING:  # the executor's module loads the compiled sandbox: not on the trainer path
    from rlef_hpc.sandbox import Executor


def near_miss(source: str) -> str | None:
    """The program with its first integer literal off by one (else the letter of its first
    one-letter string the next one): what a policy that has not learnt to read the constants
    writes."""
    number = re.search(r"(?<![\w.])\d+(?![\w.])", source)
    if number:
        value = int(number.group()) + 1
        return source[: number.start()] + str(value) + source[number.end() :]
    letter = re.search(r"'([a-zA-Z])'", source)
    if letter:
        base = ord("a" if letter.group(1).islower() else "A")
        shifted = chr((ord(letter.group(1)) - base + 1) % 26 + base)
        return source[: letter.start(1)] + shifted + source[letter.end(1) :]
    return None


def _reference(problem: Problem, language: str) -> str | None:
    return next((s.source for s in problem.solutions if s.language == language), None)


def _answer(tokenizer: Any, conversation: Conversation, code: str, language: str) -> list[int]:
    """A response with `code` fenced as the template asks, then end of turn."""
    answer = f"```{FENCE_TAGS[language]}\n{code.rstrip()}\n```"
    return tokenizer.encode(answer, add_special_tokens=False) + conversation.end_of_turn


def demonstrations(
    problems: Sequence[Problem],
    tokenizer: Any,
    templates: Templates,
    language: str,
    near_misses: int = 0,
) -> list[tuple[list[int], int]]:
    """(tokens, where the answer starts) per problem with a reference solution: the first
    turn's prompt, then the solution, and `near_misses` copies with a near-miss solution
    instead (see `near_miss`)."""
    out = []
    for problem in problems:
        solution = _reference(problem, language)
        if solution is None:
            continue
        conversation = Conversation(tokenizer)
        _, start = conversation.add_user(initial_prompt(templates, problem, language))
        wrong = near_miss(solution)
        for code in [solution] + ([wrong] * near_misses if wrong else []):
            out.append(
                (conversation.tokens + _answer(tokenizer, conversation, code, language), start)
            )
    if not out:
        raise ValueError(f"warm start: no {language} reference solutions in the problems")
    return out


def repair_demonstrations(
    problems: Sequence[Problem],
    tokenizer: Any,
    templates: Templates,
    language: str,
    executor: Executor,
) -> list[tuple[list[int], int]]:
    """(tokens, where the last answer starts) per problem whose near-miss solution fails its
    public tests: the first turn's prompt, the near miss, the feedback an episode gives it
    (run in `executor`), then the reference solution. Trained on the last answer only: a
    policy that has seen feedback read, so that RL has that behaviour to reinforce."""
    runs = []
    for problem in problems:
        solution = _reference(problem, language)
        wrong = near_miss(solution) if solution else None
        if wrong is not None:
            job = Job.build(
                language, problem.program(wrong), problem.public_tests, problem.limits()
            )
            runs.append((problem, solution, wrong, executor.submit(job)))
    out = []
    for problem, solution, wrong, future in runs:
        results = future.result()
        if all(r.passed for r in results):  # a near miss the public tests cannot tell apart
            continue
        conversation = Conversation(tokenizer)
        conversation.add_user(initial_prompt(templates, problem, language))
        conversation.add_response(_answer(tokenizer, conversation, wrong, language))
        feedback = public_feedback(templates, language, problem.public_tests, results)
        _, start = conversation.add_user(feedback)
        out.append(
            (conversation.tokens + _answer(tokenizer, conversation, solution, language), start)
        )
    return out


# The warm start's AdamW: no weight decay, torch's default moments, clipped at norm 1; its
# learning rate is set every update (`lr_factor`), not by make_trainable's schedule.
OPTIM = OptimConfig(weight_decay=0.0, grad_clip=1.0, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, steps: int, warmup: int = 10) -> float:
    """The learning rate of update `step` (from 0) of `steps`, relative to the peak: a linear
    warm-up over `warmup` updates times a linear decay to a tenth. Not expressible in
    megatron's scheduler (its warm-up and decay do not overlap), so set on the optimizer
    directly."""
    return min(1.0, (step + 1) / max(1, warmup)) * max(0.1, 1 - step / steps)


def answer_batch(
    batch: Sequence[tuple[list[int], int]],
    device: torch.device | str | None = None,
    multiple: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [b, s], right-padded with 0 to a `multiple` of tokens (see
    rlef_hpc.models.gpt.sequence_multiple); which positions are answer tokens [b, s]) of
    demonstrations (tokens, where the answer starts)."""
    length = -(-max(len(t) for t, _ in batch) // multiple) * multiple
    tokens = torch.zeros(len(batch), length, dtype=torch.long, device=device)
    answer = torch.zeros(len(batch), length, dtype=torch.bool, device=device)
    for row, (seq, start) in enumerate(batch):
        tokens[row, : len(seq)] = torch.tensor(seq, device=device)
        answer[row, max(start, 1) : len(seq)] = True  # position 0 is predicted by nothing
    return tokens, answer


def answer_targets(tokens: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(where the logits that predict the answer tokens are, as an index into the hidden states
    [s, b] flattened (megatron's sequence-first layout: rlef_hpc.rl.passes.forward); those
    tokens) of a batch from `answer_batch`. Position p is predicted by the hidden state at
    p - 1; `answer` is never set at position 0."""
    positions, rows = answer.t().nonzero(as_tuple=True)  # in [s, b] order
    return (positions - 1) * tokens.shape[0] + rows, tokens[rows, positions]


def _nll(
    targets: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron's loss function: the mean negative log-likelihood of the answer tokens, from
    the logits [1, n, vocab shard] of the positions that predict them."""
    logp, _ = vocab_parallel_logprobs(logits[0], targets)
    nll = -logp.sum() / len(targets)
    return nll, {"loss": nll.detach()}


def _nll_all_positions(
    tokens: torch.Tensor, answer: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`_nll` from every position's logits [b, s, vocab shard] (sequence parallelism: the
    output layer gathers the sequence itself, so it cannot be given a selection)."""
    logp, _ = next_token_logprobs(logits, tokens)
    nll = -(logp * answer).sum() / answer.sum()
    return nll, {"loss": nll.detach()}


def _forward_step(data: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    """Megatron's forward step: the next (tokens, answer) through `model`, and its loss. The
    output layer and the loss see only the answer tokens' predictions (under a fifth of the
    demo's positions), as the PPO update's do (rlef_hpc.rl.passes.forward)."""
    tokens, answer = next(data)
    length = tokens.shape[1]
    positions = torch.arange(length, device=tokens.device).expand(len(tokens), -1)
    mask = causal_mask(length, tokens.device)
    if model.config.sequence_parallel:
        return model(tokens, positions, mask), partial(_nll_all_positions, tokens, answer)
    index, targets = answer_targets(tokens, answer)
    return forward(model, tokens, positions, mask, index), partial(_nll, targets)


@dataclasses.dataclass
class WarmStartResult:
    losses: list[float]  # this rank's training loss at each step
    # (step, the held-out loss after it) at each look; the policy kept is the lowest's
    heldout: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    @property
    def kept(self) -> tuple[int, float] | None:
        return min(self.heldout, key=lambda x: x[1]) if self.heldout else None


def _run(trainable: Any, tokens: torch.Tensor, answer: torch.Tensor, forward_only: bool) -> Any:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    [out] = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter([(tokens, answer)]),
        model=[trainable.model],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=len(tokens),
        forward_only=forward_only,
    )
    return out


def heldout_loss(
    trainable: Any, examples: list[tuple[list[int], int]], multiple: int, batch_size: int
) -> float:
    """The answer tokens' mean negative log-likelihood over `examples`, every data-parallel
    rank taking an interleaved share, averaged over all of their tokens."""
    from megatron.core import parallel_state as ps

    rank, world = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    device = next(trainable.model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # nll summed, tokens
    mine = examples[rank::world]
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            tokens, answer = answer_batch(mine[i : i + batch_size], device, multiple)
            count = int(answer.sum())
            total += torch.tensor(
                [float(_run(trainable, tokens, answer, True)["loss"]) * count, count],
                dtype=torch.float64,
                device=device,
            )
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    return float(total[0] / total[1])


def warm_start(
    model: torch.nn.Module,
    examples: list[tuple[list[int], int]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = False,
    warmup: int = 10,
    heldout: list[tuple[list[int], int]] | None = None,
    look_every: int = 0,
) -> WarmStartResult:
    """AdamW on the answer tokens' negative log-likelihood, through megatron's DDP, optimizer
    and forward-backward schedule (see rlef_hpc.rl.optim): data-parallel ranks take interleaved
    shares of each batch and their gradients are averaged; tensor-parallel ranks of a group see
    the same batch. `model` (one pipeline stage: the warm start runs without pipeline
    parallelism) is updated in place. With `heldout` demonstrations and `look_every`, their
    loss is measured every `look_every` steps and after the last, and the model ends with the
    weights of the lowest: how long a small model should memorise its demonstrations depends
    on its seed, and what it then does on problems it has not seen shows in that loss."""
    from megatron.core import parallel_state as ps

    rank, world = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    device = next(model.parameters()).device
    trainable = make_trainable(model, dataclasses.replace(OPTIM, lr=lr))
    multiple = sequence_multiple(model.config)
    rng = random.Random(seed)
    result = WarmStartResult([])
    best: list[torch.Tensor] | None = None
    looks = bool(heldout) and look_every > 0
    bar = range(steps)
    if progress:
        bar = progress_bar(bar, desc="warm start", unit="step")
    model.train()
    for step in bar:
        tokens, answer = answer_batch(
            rng.sample(examples, min(batch_size, len(examples)))[rank::world], device, multiple
        )
        for group in trainable.optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup)
        trainable.model.zero_grad_buffer()
        trainable.optimizer.zero_grad()
        out = _run(trainable, tokens, answer, False)
        trainable.finish_grads()  # the data-parallel average
        look = looks and ((step + 1) % look_every == 0 or step == steps - 1)
        # clipped by the norm over the model-parallel group; the parameters' all-gather (when
        # overlapped) waits for the next step's forward, and is finished where they are read
        trainable.step(gather=look or step == steps - 1)
        result.losses.append(float(out["loss"]))
        if look:
            assert heldout is not None
            # in batches no larger than a training step's share: no more memory than training
            share = -(-batch_size // world)
            result.heldout.append((step + 1, heldout_loss(trainable, heldout, multiple, share)))
            if result.kept == result.heldout[-1]:
                best = [p.detach().clone() for p in model.parameters()]
        if progress:
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(model.parameters(), best, strict=True):
                p.copy_(kept)
    return result
