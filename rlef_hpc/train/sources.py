"""Where each iteration's trajectories come from: one class per rollout layout, each owning
what it needs (an engine, a shard store) and the hooks the loop calls around the update.

- Colocated: each data-parallel rank's own engine generates the rank's share of the
  iteration's episodes, sleeps through the update (its memory is the update's), then takes
  the new weights in memory and is checked against the trainer (on-policy).
- AsyncColocated: the same engines generate iteration k+1's episodes while the policy trains
  on iteration k's (one version stale, corrected by the truncated importance weights).
- Disaggregated: no engine here; after every update the policy goes to the rollout workers
  over the weight bus (rlef_hpc.rollout.bus), and as files in run_dir/weights where the bus
  did not reach them all; this iteration's trajectory shards are claimed from the workers
  (see rlef_hpc.train.rollout_worker and rlef_hpc.rollout.shards).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from rlef_hpc import dist_env
from rlef_hpc.checkpoint.hf_dir import hf_weights
from rlef_hpc.data.problem import Problem
from rlef_hpc.data.trajectory import Trajectory
from rlef_hpc.dist_env import host_group
from rlef_hpc.episodes.conversation import Conversation
from rlef_hpc.episodes.runner import EpisodeConfig, EpisodeRunner
from rlef_hpc.episodes.templates import initial_prompt
from rlef_hpc.models.config import ModelConfig
from rlef_hpc.models.gpt import causal_mask, sequence_multiple
from rlef_hpc.rl.logprobs import next_token_logprobs
from rlef_hpc.rollout.bus import BusSender
from rlef_hpc.rollout.publish import latest_version, publish
from rlef_hpc.rollout.refit import check_batch_mismatch, check_mismatch
from rlef_hpc.rollout.shards import ShardStore, load_shards
from rlef_hpc.rollout.vllm_engine import VLLMGenerator, build_engine
from rlef_hpc.sandbox import Executor
from rlef_hpc.seeding import seed_sampling
from rlef_hpc.train.config import TrainConfig
from rlef_hpc.train.problems import draw


class RolloutSource(Protocol):
    # Runs episodes with this process's engine (evaluation); None where there is none.
    episodes: Callable[..., list[Trajectory]] | None

    def batch(self, iteration: int) -> tuple[list[Trajectory], dict[str, float]]:
        """This data-parallel rank's trajectories of `iteration`, and how they came."""

    def before_update(self) -> None: ...

    def after_update(self, iteration: int, metrics: dict[str, float]) -> dict[str, float]:
        """The updated policy to whoever generates next; returns what that took."""

    def finish(self) -> None:
        """Training is over (not merely stopped)."""

    def close(self) -> None: ...


def _ranks() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def own_engine(cfg: TrainConfig, init_dir: Path) -> VLLMGenerator | None:
    """This training process's engine over the initial policy in `init_dir` (colocated), or
    None where the layout gives it none. Built before the trainer's models and optimizers:
    vLLM takes rollout.gpu_memory_utilization of the whole GPU and refuses to start unless that
    much is free. What an earlier step in this process freed (the warm start's) is still held
    in PyTorch's cache until returned to the device."""
    if cfg.rollout.layout == "disaggregated":
        return None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return build_engine(
        str(init_dir), cfg.rollout, cfg.run.seed, cfg.precision.dtype, colocated=True
    )


class Colocated:
    def __init__(
        self,
        cfg: TrainConfig,
        engine: VLLMGenerator,
        tokenizer: Any,
        executor: Executor,
        policy: torch.nn.Module,
        model_cfg: ModelConfig,
        problems: tuple[list[Problem], list[Problem]],
        start: int,
    ) -> None:
        self.cfg, self.tokenizer, self.executor = cfg, tokenizer, executor
        self.policy, self.model_cfg = policy, model_cfg
        self.train_problems = problems[0]
        self.rank = dist.get_rank()
        self.dp_rank, self.dp = _ranks()
        self.engine = engine
        self.probe = probe_sequences(
            tokenizer,
            problems[1][:2] or problems[0][:2],
            cfg.episodes,
            sequence_multiple(policy.config),
        )
        if start > 0:  # the engine starts from init/: give it the restored policy
            self.refit()

    def episodes(
        self,
        problems: list[Problem],
        key: str,
        temperature: float,
        top_p: float,
        episodes: EpisodeConfig | None = None,
        progress: bool = True,
    ) -> list[Trajectory]:
        """Episodes of `problems` on this rank's engine. Sampling draws from torch's generator,
        seeded from (run seed, `key`, rank): with the runner's deterministic batching, a
        resumed run samples exactly what the uninterrupted one did."""
        seed_sampling(self.cfg.run.seed, key, self.rank)

        def generate(prompts: list[list[int]]) -> Any:
            return self.engine(prompts, temperature=temperature, top_p=top_p)

        runner = EpisodeRunner(
            self.tokenizer, self.executor, generate, episodes or self.cfg.episodes
        )
        return runner.run(problems, progress=progress and self.rank == 0)

    def generate(self, iteration: int, progress: bool = True) -> tuple[list[Trajectory], dict]:
        r = self.cfg.rollout
        per_iteration = r.rollouts_per_iteration // r.samples_per_problem
        drawn = draw(
            self.train_problems,
            self.cfg.run.seed,
            (iteration - 1) * per_iteration,
            per_iteration,
            r.samples_per_problem,
        )
        start = time.perf_counter()
        trajectories = self.episodes(
            drawn[self.dp_rank :: self.dp],
            f"train{iteration}",
            r.temperature,
            r.top_p,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        tokens = sum(u.response_end - u.prompt_end for t in trajectories for u in t.turns)
        return trajectories, {
            "rollout_seconds": seconds,
            "generated_tokens_per_second": tokens * self.dp / seconds,
        }

    def batch(self, iteration: int) -> tuple[list[Trajectory], dict[str, float]]:
        return self.generate(iteration)

    def before_update(self) -> None:
        self.engine.sleep()  # GPUs: its memory is the update's (a no-op on CPU)

    def after_update(self, iteration: int, metrics: dict[str, float]) -> dict[str, float]:
        # Every token of the batch was compared (trainer pi_old vs the engine's sampling
        # log-probs): a wrong refit or engine must not train on silently.
        check_batch_mismatch(metrics, self.cfg.rollout.mismatch, iteration)
        # The weights first: the refit's gathered tensors need room before the KV cache (most
        # of the engine's share) takes it back.
        self.engine.wake(["weights"])
        seconds = self.load_policy()
        self.engine.wake(["kv_cache"])
        return self.check_refit(seconds)

    def refit(self) -> dict[str, float]:
        """The policy's weights into the (awake) engine, then the refit check."""
        return self.check_refit(self.load_policy())

    def load_policy(self) -> float:
        """The policy's weights into the engine, in memory; returns the seconds it took."""
        start = time.perf_counter()
        self.engine.update_weights(hf_weights(self.policy, self.model_cfg))
        return time.perf_counter() - start

    def check_refit(self, seconds: float) -> dict[str, float]:
        """The engine's log-probs on the probe sequences against the trainer's (fails past
        rollout.mismatch's limits), with the refit's `seconds`."""
        device = next(self.policy.parameters()).device
        x = self.probe.to(device)
        length = x.shape[1]
        # Under FP8, TE casts the weights to FP8 only in a forward whose is_first_microbatch
        # is True and otherwise reuses the cast it cached (TE 2.11 module/linear.py and
        # layernorm_linear.py: `update_workspace = is_first_microbatch is None or
        # is_first_microbatch`); megatron's TE wrappers set the flag False after every forward
        # (core/extensions/transformer_engine.py TELinear.forward) and only the schedules set
        # it True again (pipeline_parallel/schedules.py forward_step). The probe runs outside
        # a schedule after the optimizer step: as a schedule's first micro-batch, so that it
        # sees the weights the engine was given, not the casts made before the step.
        self.policy.set_is_first_microbatch()
        with torch.no_grad():
            positions = torch.arange(length, device=device).expand(len(x), -1)
            logits = self.policy(x, positions, causal_mask(length, device))
            # Compared on the host, where the engine's log-probs arrive as lists.
            trainer = next_token_logprobs(logits.float(), x)[0][:, 1:].cpu()
        engine = torch.tensor(self.engine.sequence_logprobs(self.probe.tolist()), device="cpu")
        engine = engine[:, 1:]
        mask = torch.ones_like(trainer, dtype=torch.bool)
        stats = check_mismatch(trainer, engine, mask, self.cfg.rollout.mismatch)
        return {
            "refit_seconds": seconds,
            "refit_mismatch_mean": stats["mismatch_mean"],
            "refit_mismatch_max": stats["mismatch_max"],
        }

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class AsyncColocated(Colocated):
    """The per-batch guard cannot apply here (the batch comes from the previous policy): the
    refit probe is the guard. A resumed run samples its first batch afresh."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The engine runs in the thread that calls it (vLLM's UniProcExecutor.collective_rpc
        # runs the worker's method in the caller's thread; its Worker.init_device set the
        # device in the thread that built it) and orders its output copies on
        # torch.cuda.current_stream(): the background thread takes this rank's device, not
        # the CUDA device 0 every new thread starts with.
        self._background = concurrent.futures.ThreadPoolExecutor(
            1, "rollout", initializer=use_device, initargs=(dist_env.device(),)
        )
        self._pending: concurrent.futures.Future | None = None

    def batch(self, iteration: int) -> tuple[list[Trajectory], dict[str, float]]:
        if self._pending is not None:
            trajectories, stats = self._pending.result()
        else:
            trajectories, stats = self.generate(iteration)
        self._pending = None
        if iteration < self.cfg.run.iterations:
            self._pending = self._background.submit(self.generate, iteration + 1, False)
        return trajectories, stats

    def before_update(self) -> None:
        pass  # the engine is generating the next batch

    def after_update(self, iteration: int, metrics: dict[str, float]) -> dict[str, float]:
        self._wait()  # the engine must be idle to take new weights
        return self.refit()

    def _wait(self) -> None:
        if self._pending is not None:
            concurrent.futures.wait([self._pending])

    def close(self) -> None:
        self._wait()  # episodes of an iteration that will not run now
        self._pending = None
        self._background.shutdown()


class Disaggregated:
    episodes = None  # evaluation runs as a job of its own

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        policy: torch.nn.Module,
        model_cfg: ModelConfig,
        start: int,
    ) -> None:
        """The policy as version `start` for the workers, and the shard store opened."""
        self.cfg, self.run_dir, self.policy, self.model_cfg = cfg, run_dir, policy, model_cfg
        self.rank = dist.get_rank()
        self.dp_rank, self.dp = _ranks()
        self.shards = ShardStore(run_dir)
        if self.rank == 0 and start < cfg.run.iterations:
            self.shards.reopen()
        w = cfg.rollout.weights
        self.bus = None
        if w.transport == "bus":
            self.bus = BusSender(
                run_dir,
                cfg.rollout.workers,
                w.bucket_mib,
                w.join_wait_s,
                w.timeout_s,
                host_group(),
            )
        # A worker's first version comes from the files (it starts from them, or restarts).
        if latest_version(run_dir) != start:
            publish(run_dir, start, policy, model_cfg)

    def batch(self, iteration: int) -> tuple[list[Trajectory], dict[str, float]]:
        """The shards claimed for `iteration` (rank 0 claims, every rank reads the same list),
        this rank's share of their trajectories, and their staleness."""
        r = self.cfg.rollout
        start = time.perf_counter()
        claimed: list[Any] = [None]
        if self.rank == 0:
            claimed[0] = self.shards.claim(
                iteration,
                r.rollouts_per_iteration // r.shard_rollouts,
                min_version=iteration - 1 - r.max_staleness,
                timeout_s=r.shard_timeout_s,
            )
        dist.broadcast_object_list(claimed, src=0, group=host_group())
        shards = load_shards(claimed[0])
        everything = [t for _, trajectories in shards for t in trajectories]
        staleness = [iteration - 1 - version for version, _ in shards]
        return everything[self.dp_rank :: self.dp], {
            "rollout_seconds": time.perf_counter() - start,  # the wait for shards
            "shard_staleness_mean": sum(staleness) / len(staleness),
            "shard_staleness_max": float(max(staleness)),
        }

    def before_update(self) -> None:
        pass

    def after_update(self, iteration: int, metrics: dict[str, float]) -> dict[str, float]:
        """The policy after `iteration` updates, for the rollout workers: over the bus to
        those present, and as files when the bus is off, some worker did not get it, or every
        max_staleness + 1 versions. Those keep the newest files recent enough that a worker
        which (re)starts, and has only the files until the next round, writes shards the
        trainer accepts; else a requeue of every worker would leave the trainer waiting for
        shards while they wait for its next version."""
        stats: dict[str, float] = {}
        if self.bus is not None:
            stats = self.bus.send(iteration, lambda: hf_weights(self.policy, self.model_cfg))
            if stats["bus_ok"] and iteration % (self.cfg.rollout.max_staleness + 1):
                return stats
        start = time.perf_counter()
        publish(self.run_dir, iteration, self.policy, self.model_cfg)
        return {**stats, "publish_seconds": time.perf_counter() - start}

    def finish(self) -> None:
        if self.rank == 0:
            self.shards.finish()  # the rollout workers exit

    def close(self) -> None:
        pass


def use_device(device: torch.device) -> None:
    """`device` as this thread's CUDA device (CUDA's current device is per thread)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def probe_sequences(
    tokenizer: Any, problems: list[Problem], episodes: EpisodeConfig, multiple: int = 1
) -> torch.Tensor:
    """The refit check's sequences: first prompts of the problems, cut to one length, a
    `multiple` of tokens (the model's sequence_multiple, which FP8 with sequence parallelism
    can make longer than a prompt: then each prompt is repeated up to it, as good a probe,
    both sides seeing the same tokens)."""
    sequences = []
    for p in problems:
        conversation = Conversation(tokenizer)
        conversation.add_user(initial_prompt(episodes.templates, p.description, episodes.language))
        sequences.append(conversation.tokens)
    length = max(multiple, min(len(s) for s in sequences) // multiple * multiple)
    sequences = [(s * -(-length // len(s)))[:length] for s in sequences]
    return torch.tensor(sequences, device="cpu")  # moved where checked


def make_source(
    cfg: TrainConfig,
    run_dir: Path,
    engine: VLLMGenerator | None,
    tokenizer: Any,
    executor: Executor,
    policy: torch.nn.Module,
    model_cfg: ModelConfig,
    problems: tuple[list[Problem], list[Problem]],
    start: int,
) -> RolloutSource:
    """`engine`: this process's (own_engine), None in the disaggregated layout."""
    if engine is None:
        return Disaggregated(cfg, run_dir, policy, model_cfg, start)
    kind = AsyncColocated if cfg.rollout.asynchronous else Colocated
    return kind(cfg, engine, tokenizer, executor, policy, model_cfg, problems, start)
