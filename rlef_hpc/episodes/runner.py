"""Multi-turn RLEF episodes: problem -> code -> public-test feedback -> code ... -> verdict.

The runner needs only a `generate(prompts) -> generations` callable (a batch of token prompts
in, sampled tokens and their log-probs out) and a sandbox executor: it knows nothing of the
model behind `generate`. Many episodes run at once: prompts of every episode waiting for the
model go out in batches, and while one batch is generated the previous batch's code runs in
the sandbox, so the two overlap.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rlef_hpc.data.problem import Problem
from rlef_hpc.data.trajectory import Trajectory, Turn
from rlef_hpc.episodes.conversation import Conversation
from rlef_hpc.episodes.extract import extract_code, python_parses
from rlef_hpc.episodes.templates import (
    Templates,
    feedback_message,
    fill,
    initial_prompt,
    public_feedback,
)
from rlef_hpc.progress import progress_bar
from rlef_hpc.sandbox import Job, TestResult, Verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    logprobs: list[float]


GenerateFn = Callable[[list[list[int]]], Sequence[Generation]]


@dataclass(frozen=True)
class EpisodeConfig:
    """Turns, rewards and message templates of an episode."""

    max_turns: int = 3
    language: Literal["python", "cpp"] = "python"
    success_reward: float = 1.0
    failure_reward: float = -1.0
    invalid_code_reward: float = -0.2
    generation_batch: int = 64  # prompts per generate() call
    # "random": the paper's ablation; each feedback message is replaced by one given to an
    # episode of another problem (while none exists yet, by the "none" message: never the
    # problem's own). "none": the message without the failing tests (header and footer only),
    # so that a retry is asked for but nothing says what went wrong.
    feedback: Literal["real", "random", "none"] = "real"
    # Generate each batch only once every running execution has finished: the batches (and so
    # the samples, under a seeded engine) no longer depend on timing, at the cost of overlap.
    deterministic: bool = False
    templates: Templates = field(default_factory=Templates)

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {self.max_turns}")
        if self.generation_batch < 1:
            raise ValueError(f"generation_batch must be positive, got {self.generation_batch}")


class _Episode:
    def __init__(self, problem: Problem, conversation: Conversation, prompt_span: tuple[int, int]):
        self.problem = problem
        self.conversation = conversation
        self.prompt_span = prompt_span
        self.turns: list[Turn] = []
        self.success = False
        self.sandbox_error = False  # a job the sandbox could not run ended the episode


class EpisodeRunner:
    def __init__(
        self,
        tokenizer: Any,
        executor: Any,
        generate: GenerateFn,
        config: EpisodeConfig | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.executor = executor
        self.generate = generate
        self.config = config or EpisodeConfig()
        self._given: list[tuple[str, str]] = []  # (problem, feedback) for random feedback
        self._rng = random.Random(0)

    def run(self, problems: Sequence[Problem], progress: bool = False) -> list[Trajectory]:
        """One episode per problem (repeat a problem for several rollouts); results in order."""
        episodes = [self._start(p) for p in problems]
        ready = collections.deque(episodes)
        running: dict[concurrent.futures.Future[list[TestResult]], tuple[_Episode, str]] = {}
        bar = None
        if progress:
            bar = progress_bar(total=len(episodes), desc="episodes", unit="ep")
        while ready or running:
            if ready:
                batch = [
                    ready.popleft() for _ in range(min(len(ready), self.config.generation_batch))
                ]
                generations = self.generate([e.conversation.tokens for e in batch])
                if len(generations) != len(batch):
                    raise ValueError(
                        f"generate() returned {len(generations)} for {len(batch)} prompts"
                    )
                for episode, generation in zip(batch, generations, strict=True):
                    future = self._respond(episode, generation)
                    if future is not None:
                        running[future] = (episode, "public")
                    elif not self._next_turn(episode, None):
                        self._finish(episode, bar)
                    else:
                        ready.append(episode)
            # Collect finished executions; wait for one only when nothing can be generated.
            if self.config.deterministic and running:
                concurrent.futures.wait(running)
                done = list(running)  # in submission order
            elif ready:
                done = [f for f in running if f.done()]
            elif running:
                done = concurrent.futures.wait(running, return_when="FIRST_COMPLETED").done
            else:
                done = []
            for future in done:
                episode, stage = running.pop(future)
                results = _results(future)
                if results is None or any(r.verdict is Verdict.SANDBOX_ERROR for r in results):
                    # Not the policy's doing: no verdict, no reward, and no further turn (its
                    # feedback would be about the sandbox). Marked for the trainer and metrics.
                    episode.sandbox_error = True
                    if results is not None and stage == "public":
                        episode.turns[-1].public_verdicts = [r.verdict.value for r in results]
                    self._finish(episode, bar)
                elif stage == "private":
                    episode.success = all(r.passed for r in results)
                    self._finish(episode, bar)
                elif self._next_turn(episode, results):
                    ready.append(episode)
                elif episode.turns[-1].passed_public and episode.problem.private_tests:
                    running[self._judge(episode)] = (episode, "private")
                else:
                    episode.success = episode.turns[-1].passed_public
                    self._finish(episode, bar)
        if bar is not None:
            bar.close()
        return [self._trajectory(e) for e in episodes]

    # --- steps ---------------------------------------------------------------------------------

    def _start(self, problem: Problem) -> _Episode:
        conversation = Conversation(self.tokenizer)
        text = initial_prompt(self.config.templates, problem.description, self.config.language)
        return _Episode(problem, conversation, conversation.add_user(text))

    def _respond(self, episode: _Episode, generation: Generation) -> Any:
        """Records the response; submits its code to the public tests (None if no code)."""
        if len(generation.logprobs) != len(generation.tokens):
            raise ValueError("a generation needs one log-prob per token")
        start, end, text = episode.conversation.add_response(list(generation.tokens))
        code = extract_code(text, self.config.language)
        # Python that does not parse is known invalid here; C++ is known after compiling.
        valid = code is not None and (self.config.language != "python" or python_parses(code))
        turn = Turn(*episode.prompt_span, end, list(generation.logprobs), text, code, valid)
        assert turn.prompt_end == start
        episode.turns.append(turn)
        if code is None:
            return None
        problem = episode.problem
        job = Job.build(
            self.config.language, problem.program(code), problem.public_tests, problem.limits()
        )
        return self.executor.submit(job)

    def _next_turn(self, episode: _Episode, results: list[TestResult] | None) -> bool:
        """Records the public verdicts; adds feedback and returns True if another turn follows."""
        turn = episode.turns[-1]
        templates = self.config.templates
        if results is not None:
            turn.public_verdicts = [r.verdict.value for r in results]
            turn.passed_public = all(r.passed for r in results)
            if any(r.verdict is Verdict.COMPILE_ERROR for r in results):
                turn.valid = False
        if not turn.valid:
            turn.reward += self.config.invalid_code_reward
        if turn.passed_public or len(episode.turns) >= self.config.max_turns:
            return False
        if results is None:
            fence = "python" if self.config.language == "python" else "cpp"
            message = fill(templates.no_code, fence=fence)
        else:
            tests = episode.problem.public_tests
            message = public_feedback(templates, self.config.language, tests, results)
            message = self._shown_feedback(episode.problem.name, message)
        turn.feedback = message
        episode.prompt_span = episode.conversation.add_user(message)
        return True

    def _shown_feedback(self, problem: str, message: str) -> str:
        """What the policy is shown after a failure whose real feedback is `message`."""
        if self.config.feedback == "real":
            return message
        withheld = feedback_message(self.config.templates, self.config.language, [])
        if self.config.feedback == "none":
            return withheld
        self._given.append((problem, message))
        others = [m for p, m in self._given if p != problem]
        return self._rng.choice(others) if others else withheld

    def _judge(self, episode: _Episode) -> Any:
        """The final answer passed the public tests: now the private ones decide."""
        code = episode.turns[-1].code
        problem = episode.problem
        program = problem.program(code)
        job = Job.build(self.config.language, program, problem.private_tests, problem.limits())
        return self.executor.submit(job)

    def _finish(self, episode: _Episode, bar: Any) -> None:
        if not episode.sandbox_error:
            reward = self.config.success_reward if episode.success else self.config.failure_reward
            episode.turns[-1].reward += reward
        if bar is not None:
            bar.update()

    def _trajectory(self, episode: _Episode) -> Trajectory:
        return Trajectory(
            problem=episode.problem.name,
            language=self.config.language,
            tokens=list(episode.conversation.tokens),
            turns=episode.turns,
            success=episode.success,
            messages=list(episode.conversation.messages),
            sandbox_error=episode.sandbox_error,
        )


def _results(future: concurrent.futures.Future[list[TestResult]]) -> list[TestResult] | None:
    """A job's results, or None where the sandbox raised instead of answering (an executor
    closed under it): never an exception in the training step."""
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - whatever the sandbox raised, the episode is marked
        log.exception("the sandbox could not run a job; its episode is marked sandbox_error")
        return None
