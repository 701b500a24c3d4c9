"""The trajectory record: what an episode produces and what PPO consumes. Defined once, here.

Token positions index `Trajectory.tokens`, the whole conversation exactly as the policy saw and
sampled it. Turn t's prompt is everything before its response; the tokens it added to the
conversation are [prompt_start, prompt_end), its response [prompt_end, response_end), and its
value V(c_t) is read at `value_index` = prompt_end - 1, the last prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Turn:
    prompt_start: int
    prompt_end: int
    response_end: int
    behaviour_logprobs: list[float]  # one per response token, from the sampling engine
    response_text: str
    code: str | None  # None: no code block in the response
    valid: bool  # a code block that parses / compiles
    public_verdicts: list[str] = field(default_factory=list)
    passed_public: bool = False
    feedback: str | None = None  # the message that followed this turn, if any
    reward: float = 0.0  # invalid-code penalty, plus the terminal reward on the last turn

    @property
    def value_index(self) -> int:
        return self.prompt_end - 1

    @property
    def response_tokens(self) -> range:
        return range(self.prompt_end, self.response_end)


@dataclass
class Trajectory:
    problem: str
    language: str
    tokens: list[int]
    turns: list[Turn]
    success: bool  # the last answer passed every public and private test
    messages: list[dict[str, str]] = field(default_factory=list)
    # The sandbox could not run one of its jobs (SANDBOX_ERROR, see rlef_hpc.sandbox): the
    # episode ended there, without a terminal reward. Not a verdict on the policy: train on it
    # and a policy that found a way to break the sandbox would be rewarded for it.
    sandbox_error: bool = False

    @property
    def trainable(self) -> bool:
        """Whether PPO may learn from it: not where the sandbox failed to judge it (its reward
        says nothing of the policy, and is higher than a failure's). rlef_hpc.rl.ppo.collate
        gives such a trajectory an empty row."""
        return not self.sandbox_error

    @property
    def total_reward(self) -> float:
        return sum(t.reward for t in self.turns)

    def response_mask(self) -> list[bool]:
        """True at the tokens the policy produced (the ones PPO trains on)."""
        mask = [False] * len(self.tokens)
        for turn in self.turns:
            mask[turn.prompt_end : turn.response_end] = [True] * (
                turn.response_end - turn.prompt_end
            )
        return mask
