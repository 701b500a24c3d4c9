"""A policy that answers from fixed scripts: for tests, and for evaluating answers generated
elsewhere (`rlef-eval --answers`).

scripts[problem name] is a list of rollouts, each the list of responses for turns 1, 2, ...
The runner gives a policy nothing but token prompts, so the policy finds its place from them:
the problem from the first prompt, the turn from the number of finished messages, and the
rollout from the responses already given (rollouts that agree so far are taken in turn).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

from rlef_hpc.data.problem import Problem
from rlef_hpc.episodes.runner import Generation
from rlef_hpc.episodes.templates import Templates, initial_prompt


class ScriptedPolicy:
    def __init__(
        self,
        tokenizer: Any,
        problems: Sequence[Problem],
        scripts: Mapping[str, Sequence[Sequence[str]]],
        templates: Templates | None = None,
        language: str = "python",
        logprob: float = -0.5,
        strict: bool = True,
    ) -> None:
        """strict: a turn the script has no response for is an error; otherwise the policy
        answers it with nothing (an invalid turn), as replayed answers may run out."""
        self.tokenizer = tokenizer
        self.strict = strict
        self.scripts = scripts
        self.logprob = logprob
        templates = templates or Templates()
        self.first_prompts = [(initial_prompt(templates, p, language), p.name) for p in problems]
        self.eot = tokenizer.eos_token
        self.turns_taken: collections.Counter[tuple[str, tuple[str, ...]]] = collections.Counter()

    def __call__(self, prompts: list[list[int]]) -> list[Generation]:
        return [self._answer(self.tokenizer.decode(p, skip_special_tokens=False)) for p in prompts]

    def _answer(self, prompt: str) -> Generation:
        name = next((n for text, n in self.first_prompts if text in prompt), None)
        if name is None or name not in self.scripts:
            raise KeyError(f"no script for the problem of this prompt: {prompt[:200]!r}")
        turn = prompt.count(self.eot) // 2  # each finished message ends with end-of-turn
        # Rollouts whose earlier responses all appear, in order, in this prompt.
        candidates = []
        for rollout in self.scripts[name]:
            position, ok = 0, len(rollout) > turn
            for response in rollout[:turn]:
                position = prompt.find(response, position)
                ok &= position >= 0
            if ok:
                candidates.append(rollout)
        if not candidates:
            if self.strict:
                raise KeyError(f"no scripted response for turn {turn + 1} of {name!r}")
            tokens = self.tokenizer.encode(self.eot, add_special_tokens=False)
            return Generation(tokens, [self.logprob] * len(tokens))
        key = (name, tuple(r[turn - 1] for r in candidates[:1]) if turn else ())
        choice = candidates[self.turns_taken[key] % len(candidates)]
        self.turns_taken[key] += 1
        tokens = self.tokenizer.encode(choice[turn] + self.eot, add_special_tokens=False)
        return Generation(tokens, [self.logprob] * len(tokens))
