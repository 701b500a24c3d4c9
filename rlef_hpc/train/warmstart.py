"""Supervised warm start: next-token loss on reference solutions, as the episode's first turn
would present them, so that a policy built from scratch starts RL able to answer at all."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc.data.problem import Problem
from rlef_hpc.episodes.conversation import Conversation
from rlef_hpc.episodes.templates import FENCE_TAGS, Templates, initial_prompt, public_feedback
from rlef_hpc.rl.logprobs import token_logprobs
from rlef_hpc.sandbox import Executor, Job


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
        _, start = conversation.add_user(initial_prompt(templates, problem.description, language))
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
        conversation.add_user(initial_prompt(templates, problem.description, language))
        conversation.add_response(_answer(tokenizer, conversation, wrong, language))
        feedback = public_feedback(templates, language, problem.public_tests, results)
        _, start = conversation.add_user(feedback)
        out.append(
            (conversation.tokens + _answer(tokenizer, conversation, solution, language), start)
        )
    return out


def clip_global_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clips by the norm of the whole model's gradient: tensor-parallel shards summed over
    their group, replicated parameters (norms) counted once."""
    from megatron.core import parallel_state as ps

    grads = [p for p in params if p.grad is not None]
    split = sum(
        (p.grad.float().pow(2).sum() for p in grads if getattr(p, "tensor_model_parallel", False)),
        torch.zeros(()),
    )
    whole = sum(
        (
            p.grad.float().pow(2).sum()
            for p in grads
            if not getattr(p, "tensor_model_parallel", False)
        ),
        torch.zeros(()),
    )
    dist.all_reduce(split, group=ps.get_tensor_model_parallel_group())
    norm = float((split + whole).sqrt())
    if norm > max_norm:
        for p in grads:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def warm_start(
    model: torch.nn.Module,
    examples: list[tuple[list[int], int]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = False,
) -> list[float]:
    """AdamW on the answer tokens' negative log-likelihood; data-parallel ranks take
    interleaved shares of each batch and average their gradients (tensor-parallel ranks of a
    group see the same batch). Returns the losses."""
    from megatron.core import parallel_state as ps

    rank, world = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps)
    )
    rng = random.Random(seed)
    losses = []
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="warm start", unit="step")
    model.train()
    for _ in bar:
        batch = rng.sample(examples, min(batch_size, len(examples)))[rank::world]
        length = max(len(t) for t, _ in batch)
        tokens = torch.zeros(len(batch), length, dtype=torch.long)
        answer = torch.zeros(len(batch), length, dtype=torch.bool)
        for row, (seq, start) in enumerate(batch):
            tokens[row, : len(seq)] = torch.tensor(seq)
            answer[row, start : len(seq)] = True
        mask = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)
        logits = model(tokens, torch.arange(length).expand(len(batch), -1), mask)
        logp, _ = token_logprobs(logits[:, :-1], tokens[:, 1:])
        target = answer[:, 1:]
        loss = -(logp * target).sum() / target.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
                p.grad /= world
        clip_global_norm(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
