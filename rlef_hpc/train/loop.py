"""The RLEF training loop: where the pieces meet.

Per iteration: draw problems -> run multi-turn episodes (vLLM generates, the sandbox judges,
both overlapped) -> trajectories -> PPO (pi_old, reference, values, then minibatch updates) ->
refit the engine in memory and check it -> log; evaluate every `run.eval_every`, checkpoint
every `run.checkpoint_every`. A run directory that holds a checkpoint is resumed from it.

Runs as one process or under torchrun/srun, in one of two layouts (`rollout.layout`):
- colocated: each data-parallel rank holds a policy, a value model, the frozen reference, an
  engine and a sandbox, generates its share of the rollouts and trains on it (gradients
  reduced by megatron's DDP); tensor and pipeline parallelism need the other layout.
- disaggregated: the trainer (any TP x PP x DP) holds no engine; rollout workers
  (`rlef_hpc.train.rollout_worker`, jobs of their own) follow the weights it publishes and write
  trajectory shards, which it claims with bounded staleness (see rlef_hpc.rollout.shards).

    run_dir/
      config.yaml       the resolved config          metrics.jsonl   one record per iteration
      init/             the initial policy (HF) and tokenizer: the engine's start, the KL reference
      iter_0000004/     training checkpoints, `latest`          tensorboard/   plots/   eval/
      problems/eval.jsonl   the evaluation problems (CodeContests schema), for eval jobs
      weights/  trajectories/   disaggregated: published policy versions, trajectory shards
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from rlef_hpc.config import to_dict
from rlef_hpc.data.problem import Problem
from rlef_hpc.data.trajectory import Trajectory
from rlef_hpc.dist_env import adopt_slurm_env
from rlef_hpc.episodes.runner import EpisodeConfig, EpisodeRunner, Generation
from rlef_hpc.eval.report import EvalReport, evaluate, plot_solve_rate
from rlef_hpc.train.config import TrainConfig
from rlef_hpc.train.metrics import MetricsLog, episode_metrics, plot_training

# Exit status of a run stopped by SIGTERM/SIGUSR1/SIGUSR2 once its checkpoint is saved
# (EX_TEMPFAIL): run the same command again (or let Slurm requeue the job) to continue.
EXIT_PREEMPTED = 75
# SIGTERM: Slurm's preemption, scancel and `scontrol requeue`; SIGUSR1: the sbatch scripts'
# --signal before the time limit; SIGUSR2: submitit's.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(SystemExit):
    def __init__(self, signum: int | None = None) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.signum = signum


def init_distributed(cfg: TrainConfig) -> None:
    """torch.distributed (gloo on CPU, NCCL on GPU) from torchrun/srun's environment, or a
    one-process group; megatron's parallel state on top."""
    from megatron.core import parallel_state as ps

    p = cfg.parallel
    if (p.tensor != 1 or p.pipeline != 1) and cfg.rollout.layout == "colocated":
        raise ValueError(
            f"parallel.tensor={p.tensor}, parallel.pipeline={p.pipeline}: the colocated layout "
            "runs one engine per training process, which needs both at 1; use "
            "rollout.layout=disaggregated (rollout workers of their own) for TP/PP training"
        )
    if not dist.is_initialized():
        adopt_slurm_env()
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if torch.cuda.is_available():  # one GPU per task: srun and torchrun start 8 a node
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_world_size() != cfg.parallel.world_size:
        raise ValueError(
            f"{dist.get_world_size()} processes, but parallel.tensor x pipeline x data = "
            f"{cfg.parallel.world_size}: set parallel.data={dist.get_world_size()}"
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)


def load_problems(cfg: TrainConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems."""
    d = cfg.data
    if d.source == "synthetic":
        from rlef_hpc.data import synthetic

        return (
            synthetic.generate(d.train_problems, "train", cfg.run.seed, d.curriculum),
            synthetic.generate(d.eval_problems, "heldout", cfg.run.seed, d.curriculum),
        )
    from rlef_hpc.data.codecontests import load_problems as load

    train = load(d.train_path)
    evaluation = load(d.valid_path)[: d.eval_problems] if d.valid_path else []
    return train, evaluation


def write_problems(problems: list[Problem], path: Path) -> None:
    """Problems as CodeContests JSON lines (what rlef-eval and eval jobs read)."""
    from rlef_hpc.data.codecontests import problem_record

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(problem_record(p)) + "\n" for p in problems))
    os.replace(tmp, path)


def _tokenizer_corpus(problems: list[Problem], episodes: EpisodeConfig) -> list[str]:
    """What the demo's tokenizer is trained on: the prompts, answers and feedback it will see."""
    from rlef_hpc.episodes.templates import initial_prompt

    texts = []
    for p in problems:
        texts.append(initial_prompt(episodes.templates, p.description, episodes.language))
        texts += [f"```python\n{s.source}```" for s in p.solutions]
        texts += [f"{t.input} {t.output}" for t in p.public_tests]
    templates = [v for v in dataclasses.asdict(episodes.templates).values() if isinstance(v, str)]
    return texts * 4 + templates * 20


def save_hf_dir(model: Any, model_cfg: Any, dtype: str, tokenizer: Any, out_dir: Path) -> None:
    """The policy as a Hugging Face directory (what vLLM starts from). Collective."""
    from rlef_hpc.checkpoint.convert import ShardWriter, hf_config
    from rlef_hpc.rollout.refit import hf_weights

    weights = [(n, t.to(getattr(torch, dtype)).clone()) for n, t in hf_weights(model, model_cfg)]
    if dist.get_rank() == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(tmp)
        for name, tensor in weights:
            writer.add(name, tensor)
        writer.close()
        config = hf_config(model_cfg, dtype)
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    dist.barrier()


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        from megatron.core import parallel_state as ps

        from rlef_hpc.checkpoint import training
        from rlef_hpc.models.config import check
        from rlef_hpc.models.megatron_compat import seed

        self.cfg = cfg
        init_distributed(cfg)
        self.rank, self.dp = dist.get_rank(), ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.run_dir = Path(cfg.run.dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        dist.barrier()
        self.log = (
            MetricsLog(self.run_dir, cfg.run.tensorboard, cfg.run.wandb_project, to_dict(cfg))
            if self.rank == 0
            else None
        )
        self.train_problems, self.eval_problems = load_problems(cfg)
        if self.rank == 0:
            write_problems(self.eval_problems, self.run_dir / "problems" / "eval.jsonl")
        checkpoint = training.latest(self.run_dir)
        self.init_dir = self.run_dir / "init"
        seed(cfg.run.seed)
        # An init/ left by a run that died before its first checkpoint is reused as it is.
        if checkpoint is None and not (self.init_dir / "config.json").exists():
            self._initialise()
        from transformers import AutoTokenizer

        from rlef_hpc.models.config import ModelConfig

        self.tokenizer = AutoTokenizer.from_pretrained(self.init_dir)
        self.model_cfg = ModelConfig.from_hf(self.init_dir)
        check(self.model_cfg, cfg.parallel, cfg.precision)
        self._build_models()
        self.start = 0
        if checkpoint is not None:
            state = training.load(checkpoint, self._checkpointed(), self._schedulers())
            self.start = state["iteration"]
            self._print(f"resumed from {checkpoint} (iteration {self.start})")
        self.disaggregated = cfg.rollout.layout == "disaggregated"
        if self.disaggregated:
            self._start_publishing()
        else:
            self._start_engine()
        from rlef_hpc.sandbox import Executor

        self.executor = Executor(workers=cfg.rollout.sandbox_workers)
        training.start_writer_helpers(ignoring=STOP_SIGNALS)
        self.async_queue = None
        if cfg.run.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        self.stop_requested = False
        self.stop_signal: int | None = None
        self._background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout")
        self._pending: concurrent.futures.Future | None = None

    # --- set-up -----------------------------------------------------------------------------

    def _print(self, *args: Any) -> None:
        if self.rank == 0:
            print(*args, flush=True)

    def _initialise(self) -> None:
        """A fresh run: tokenizer and initial policy (from scratch with a warm start, or from
        a Hugging Face directory), saved as run_dir/init."""
        from rlef_hpc.models.gpt import build_gpt
        from rlef_hpc.models.tokenizer import build_tokenizer

        cfg = self.cfg
        spec = cfg.model
        if spec.init == "scratch":
            corpus = _tokenizer_corpus(self.train_problems, cfg.episodes)
            tokenizer = build_tokenizer(corpus, spec.tokenizer_vocab)
            model_cfg = spec.scratch_config(len(tokenizer) + len(tokenizer) % 2)
            policy = build_gpt(model_cfg, cfg.precision)
        else:
            from transformers import AutoTokenizer

            from rlef_hpc.checkpoint.convert import read_hf_state
            from rlef_hpc.checkpoint.hf import hf_to_megatron
            from rlef_hpc.checkpoint.layout import load_full_state
            from rlef_hpc.models.config import ModelConfig

            hf_dir = Path(spec.hf_dir)
            if not cfg.warmstart.steps:  # the initial policy is the HF model as it is
                self._copy_hf(hf_dir)
                return
            tokenizer = AutoTokenizer.from_pretrained(hf_dir)
            model_cfg = ModelConfig.from_hf(hf_dir)
            policy = build_gpt(model_cfg, cfg.precision)
            state = hf_to_megatron(read_hf_state(hf_dir), model_cfg)
            load_full_state(policy, state, model_cfg.num_layers)
        if cfg.warmstart.steps:
            from rlef_hpc.sandbox import Executor
            from rlef_hpc.train.warmstart import demonstrations, repair_demonstrations, warm_start

            w, e = cfg.warmstart, cfg.episodes
            problems = self.train_problems
            examples = demonstrations(problems, tokenizer, e.templates, e.language, w.near_misses)
            if w.repairs:
                with Executor(workers=cfg.rollout.sandbox_workers) as executor:
                    repairs = repair_demonstrations(
                        problems, tokenizer, e.templates, e.language, executor
                    )
                examples += repairs * w.repairs
            losses = warm_start(
                policy, examples, w.steps, w.batch_size, w.lr, cfg.run.seed, self.rank == 0
            )
            self._print(f"warm start: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        save_hf_dir(policy, model_cfg, cfg.precision.dtype, tokenizer, self.init_dir)

    def _copy_hf(self, hf_dir: Path) -> None:
        """run_dir/init as a copy of the HF directory's weights, config and tokenizer (not
        whatever else it holds, e.g. Llama's original/ consolidated checkpoint)."""
        from rlef_hpc.checkpoint.convert import TOKENIZER_FILES

        if self.rank == 0:
            if not (hf_dir / "config.json").exists():
                raise ValueError(f"model.hf_dir={hf_dir} is not a Hugging Face model directory")
            tmp = self.init_dir.with_name(self.init_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            names = ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES)
            for f in hf_dir.iterdir():
                if f.name in names or f.suffix == ".safetensors":
                    shutil.copy(f, tmp / f.name)
            os.replace(tmp, self.init_dir)
        dist.barrier()

    def _build_models(self) -> None:
        from rlef_hpc.checkpoint.convert import read_hf_state
        from rlef_hpc.checkpoint.hf import hf_to_megatron
        from rlef_hpc.checkpoint.layout import load_full_state
        from rlef_hpc.models.gpt import build_gpt
        from rlef_hpc.rl.update import PPOUpdate

        cfg, mc = self.cfg, self.model_cfg
        state = hf_to_megatron(read_hf_state(self.init_dir), mc)
        trunk = {k: v for k, v in state.items() if not k.startswith("output_layer")}
        self.policy = build_gpt(mc, cfg.precision)
        self.reference = build_gpt(mc, cfg.precision)
        self.value = build_gpt(mc, cfg.precision, value=True)
        load_full_state(self.policy, state, mc.num_layers)
        load_full_state(self.reference, state, mc.num_layers)
        load_full_state(self.value, trunk, mc.num_layers, strict=False)  # a fresh head
        self.update = PPOUpdate(
            self.policy,
            self.value,
            self.reference,
            cfg.ppo,
            cfg.optim,
            micro_batch_size=cfg.update.micro_batch_size,
            temperature=cfg.rollout.temperature,
        )

    def _checkpointed(self) -> list[tuple[str, Any, Any]]:
        return [(n, t.module, t.optimizer) for n, t in self.update.trainables.items()]

    def _schedulers(self) -> dict[str, Any]:
        return {n: t.scheduler for n, t in self.update.trainables.items()}

    def _start_publishing(self) -> None:
        """Disaggregated: the policy as version `start` for the workers, and the shard store
        opened for them."""
        from rlef_hpc.rollout.publish import latest_version, publish
        from rlef_hpc.rollout.shards import ShardStore

        self.shards = ShardStore(self.run_dir)
        if self.rank == 0 and self.start < self.cfg.run.iterations:
            self.shards.reopen()
        if latest_version(self.run_dir) != self.start:
            publish(self.run_dir, self.start, self.policy, self.model_cfg)

    def _start_engine(self) -> None:
        from rlef_hpc.rollout.vllm_engine import SamplingConfig, VLLMGenerator

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        r = self.cfg.rollout
        extra: dict[str, Any] = {}
        if dist.get_world_size() > 1:  # one engine per rank, inside torchrun's processes
            extra.update(tensor_parallel_size=1, distributed_executor_backend="external_launcher")
        if torch.cuda.is_available():
            # The engine sleeps (KV cache freed, weights offloaded) while the trainer updates
            # on the same GPUs; a synchronous run only (asynchronous ones generate meanwhile).
            extra["gpu_memory_utilization"] = r.gpu_memory_utilization
            extra["enable_sleep_mode"] = not r.asynchronous
        self.engine = VLLMGenerator(
            str(self.init_dir),
            SamplingConfig(r.temperature, r.top_p, r.max_tokens, seed=self.cfg.run.seed),
            kv_cache_gib=r.kv_cache_gib,
            dtype=self.cfg.precision.dtype,
            **extra,
        )
        if self.start > 0:
            self.refit()

    # --- phases -----------------------------------------------------------------------------

    def _generate(self, key: str, temperature: float, top_p: float) -> Any:
        """generate() for the episode runner. Sampling draws from torch's generator, seeded
        here from (run seed, `key`, rank): with the runner's deterministic batching, a resumed
        run samples exactly what the uninterrupted one did."""
        digest = hashlib.sha256(f"{self.cfg.run.seed}:{key}:{self.rank}".encode()).digest()
        torch.manual_seed(int.from_bytes(digest[:8], "big") % (1 << 63))

        def generate(prompts: list[list[int]]) -> list[Generation]:
            return self.engine(prompts, temperature=temperature, top_p=top_p)

        return generate

    def _episodes(
        self,
        problems: list[Problem],
        key: str,
        temperature: float,
        top_p: float,
        progress: bool = True,
        episodes: EpisodeConfig | None = None,
    ) -> list[Trajectory]:
        runner = EpisodeRunner(
            self.tokenizer,
            self.executor,
            self._generate(key, temperature, top_p),
            episodes or self.cfg.episodes,
        )
        return runner.run(problems, progress=progress and self.rank == 0)

    def draw(self, iteration: int) -> list[Problem]:
        """This rank's share of the iteration's rollouts: problems taken in a seeded order
        that reshuffles every epoch, each repeated samples_per_problem times."""
        import random

        r = self.cfg.rollout
        per_iteration = r.rollouts_per_iteration // r.samples_per_problem
        start = (iteration - 1) * per_iteration
        n = len(self.train_problems)
        drawn = []
        for i in range(start, start + per_iteration):
            order = list(range(n))
            random.Random(f"{self.cfg.run.seed}:epoch{i // n}").shuffle(order)
            drawn += [self.train_problems[order[i % n]]] * r.samples_per_problem
        return drawn[self.dp_rank :: self.dp]

    def _probe(self) -> torch.Tensor:
        """The refit check's sequences: first prompts of two problems, cut to one length."""
        from rlef_hpc.episodes.conversation import Conversation
        from rlef_hpc.episodes.templates import initial_prompt

        e = self.cfg.episodes
        sequences = []
        for p in self.eval_problems[:2] or self.train_problems[:2]:
            conversation = Conversation(self.tokenizer)
            conversation.add_user(initial_prompt(e.templates, p.description, e.language))
            sequences.append(conversation.tokens)
        length = min(len(s) for s in sequences)
        return torch.tensor([s[:length] for s in sequences])

    def refit(self) -> dict[str, float]:
        """The policy's weights into the engine, in memory; then the engine's log-probs on a
        few sequences against the trainer's (fails fast past rollout.mismatch_threshold)."""
        from rlef_hpc.rl.logprobs import token_logprobs
        from rlef_hpc.rollout.refit import check_mismatch, hf_weights

        start = time.perf_counter()
        self.engine.update_weights(hf_weights(self.policy, self.model_cfg))
        seconds = time.perf_counter() - start
        x = self._probe()
        length = x.shape[1]
        mask = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)
        with torch.no_grad():
            logits = self.policy(x, torch.arange(length).expand(len(x), -1), mask)
            trainer, _ = token_logprobs(logits[:, :-1].float(), x[:, 1:])
        engine = torch.tensor(self.engine.sequence_logprobs(x.tolist()))[:, 1:]
        stats = check_mismatch(
            trainer,
            engine,
            torch.ones_like(trainer, dtype=torch.bool),
            self.cfg.rollout.mismatch_threshold,
        )
        return {"refit_seconds": seconds, "refit_mismatch_max": stats["mismatch_max"]}

    def publish(self, version: int) -> dict[str, float]:
        """Disaggregated: the policy after `version` iterations, for the rollout workers."""
        from rlef_hpc.rollout.publish import publish

        start = time.perf_counter()
        publish(self.run_dir, version, self.policy, self.model_cfg)
        return {"publish_seconds": time.perf_counter() - start}

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))

    def claimed(self, it: int) -> tuple[list[Trajectory], dict[str, float]]:
        """Disaggregated: this rank's share of the shards claimed for iteration `it` (rank 0
        claims, every rank reads the same list), and their staleness."""
        from rlef_hpc.rollout.shards import load_shards

        r = self.cfg.rollout
        start = time.perf_counter()
        claimed: list[Any] = [None]
        if self.rank == 0:
            claimed[0] = self.shards.claim(
                it,
                r.rollouts_per_iteration // r.shard_rollouts,
                min_version=it - 1 - r.max_staleness,
                timeout_s=r.shard_timeout_s,
            )
        dist.broadcast_object_list(claimed, src=0)
        shards = load_shards(claimed[0])
        everything = [t for _, trajectories in shards for t in trajectories]
        staleness = [it - 1 - version for version, _ in shards]
        return everything[self.dp_rank :: self.dp], {
            "rollout_seconds": time.perf_counter() - start,
            "shard_staleness_mean": sum(staleness) / len(staleness),
            "shard_staleness_max": float(max(staleness)),
        }

    def rollouts(self, it: int, progress: bool = True) -> tuple[list[Trajectory], float]:
        """This rank's episodes of iteration `it`, and how long they took."""
        r = self.cfg.rollout
        start = time.perf_counter()
        trajectories = self._episodes(
            self.draw(it), f"train{it}", r.temperature, r.top_p, progress and self.rank == 0
        )
        return trajectories, time.perf_counter() - start

    def iteration(self, it: int) -> dict[str, float]:
        """Episodes, PPO, refit. Asynchronous mode: the episodes of `it + 1` are generated
        (by the engine as refit after `it - 1`) while the policy trains on those of `it`;
        the truncated importance weights correct for the one version of staleness."""
        from rlef_hpc.rl.ppo import collate
        from rlef_hpc.rollout.refit import RefitMismatchError

        cfg = self.cfg
        shard_stats: dict[str, float] = {}
        if self.disaggregated:
            trajectories, shard_stats = self.claimed(it)
            rollout_s = shard_stats.pop("rollout_seconds")
        elif self._pending is not None:
            trajectories, rollout_s = self._pending.result()
            self._pending = None
        else:
            trajectories, rollout_s = self.rollouts(it)
        if cfg.rollout.asynchronous and not self.disaggregated and it < cfg.run.iterations:
            self._pending = self._background.submit(self.rollouts, it + 1, False)
        episodes = self._mean_over_ranks(episode_metrics(trajectories, cfg.episodes.max_turns))
        start = time.perf_counter()
        batch = collate(trajectories, pad_id=self.tokenizer.pad_token_id or 0)
        # On-policy: this iteration's own engine sampled the batch and is idle now.
        on_policy = not (cfg.rollout.asynchronous or self.disaggregated)
        if on_policy:
            self.engine.sleep()  # GPUs: its memory is the update's (a no-op on CPU)
        metrics = self.update.step(batch, cfg.update.num_minibatches, progress=self.rank == 0)
        if on_policy:
            self.engine.wake()
        update_s = time.perf_counter() - start
        # Every token of the batch was compared (trainer pi_old vs the engine's sampling
        # log-probs): a wrong refit or engine must not train on silently. (Asynchronous
        # batches come from the previous policy: there the refit probe below is the guard;
        # disaggregated ones from any recent version, corrected by the importance weights.)
        limit = cfg.rollout.mismatch_threshold
        if on_policy and metrics.get("mismatch_max", 0.0) > limit:
            raise RefitMismatchError(
                f"iteration {it}: trainer and engine log-probs of the sampled tokens differ by "
                f"up to {metrics['mismatch_max']:.3g} (rollout.mismatch_threshold={limit})"
            )
        if self._pending is not None:  # the engine must be idle to take new weights
            concurrent.futures.wait([self._pending])
        refit = self.publish(it) if self.disaggregated else self.refit()
        out = {**episodes, **metrics, **refit, **shard_stats}
        out.update(rollout_seconds=rollout_s, update_seconds=update_s)
        if not self.disaggregated:  # there rollout_seconds is the wait for shards
            out["generated_tokens_per_second"] = episodes["response_tokens"] * self.dp / rollout_s
        return out

    def evaluate(self, iteration: int, tag: str) -> EvalReport | None:
        """1@3 on the evaluation problems (rank 0 gets the report)."""
        e = self.cfg.eval
        if not self.eval_problems or self.disaggregated:  # no engine here: the eval job's
            return None
        mine = [
            p
            for p in self.eval_problems[self.dp_rank :: self.dp]
            for _ in range(e.rollouts_per_problem)
        ]
        protocol = dataclasses.replace(self.cfg.episodes, max_turns=e.max_turns, feedback="real")
        trajectories = self._episodes(
            mine, f"eval{iteration}", e.temperature, e.top_p, episodes=protocol
        )
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, trajectories)
        if self.rank != 0:
            return None
        everything = [t for part in gathered for t in part]
        report = evaluate(everything, ("1@3",), e.max_turns, seed=self.cfg.run.seed)
        out = self.run_dir / "eval"
        out.mkdir(exist_ok=True)
        (out / f"{tag}.json").write_text(json.dumps(report.to_json(), indent=2))
        (out / f"{tag}.md").write_text(report.table() + "\n")
        plot_solve_rate(everything, out / f"{tag}.png", e.max_turns, title=tag)
        row = report.rows[0]
        values = {"1@3": row.mean, "1@3_low": row.low, "1@3_high": row.high}
        values.update({f"solved_by_turn_{k + 1}": v for k, v in enumerate(report.solved_by_turn)})
        self.log.write("eval", iteration, values)
        return report

    def save(self, iteration: int, asynchronous: bool) -> None:
        from dataclasses import asdict

        from rlef_hpc.checkpoint import training
        from rlef_hpc.checkpoint.convert import TOKENIZER_FILES

        if self.async_queue is not None:
            # The save in flight is committed first: a save clears temporary directories it
            # takes for killed saves', and checkpoints are committed in iteration order.
            self.async_queue.maybe_finalize_async_calls(blocking=True)
        training.save(
            self.run_dir,
            iteration,
            self._checkpointed(),
            self._schedulers(),
            {"iteration": iteration},
            keep_last=self.cfg.run.keep_last,
            model_config={**asdict(self.model_cfg), "dtype": self.cfg.precision.dtype},
            async_queue=self.async_queue if asynchronous else None,
            # The tokenizer beside the weights: the checkpoint exports to a usable HF directory.
            files=[self.init_dir / n for n in TOKENIZER_FILES if (self.init_dir / n).exists()],
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        self.stop_signal = signum
        self._print(f"signal {signal.Signals(signum).name}: checkpointing after this iteration")

    def _stop_everywhere(self) -> bool:
        flag = torch.tensor([float(self.stop_requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        before = self.evaluate(0, "before") if self.start == 0 else None
        iteration = self.start
        try:
            for iteration in range(self.start + 1, cfg.run.iterations + 1):
                metrics = self.iteration(iteration)
                if self.rank == 0:
                    self.log.write("train", iteration, metrics)
                    self._print(f"iteration {iteration}/{cfg.run.iterations}: {brief(metrics)}")
                stop = self._stop_everywhere()
                if (
                    stop
                    or iteration % cfg.run.checkpoint_every == 0
                    or iteration == cfg.run.iterations
                ):
                    self.save(iteration, asynchronous=not stop and iteration < cfg.run.iterations)
                if stop:
                    self._finish()
                    raise Preempted(self.stop_signal)
                if (
                    cfg.run.eval_every
                    and iteration % cfg.run.eval_every == 0
                    and iteration < cfg.run.iterations
                ):
                    self.evaluate(iteration, f"iter_{iteration:07d}")
            after = self.evaluate(iteration, "after")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._finish()
        if self.disaggregated and self.rank == 0:
            self.shards.finish()  # the rollout workers exit
        result = {"iterations": iteration, "before": before, "after": after}
        if self.rank == 0:
            self._print(summary_table(before, after))
        return result

    def _finish(self) -> None:
        if self._pending is not None:  # episodes of an iteration that will not run now
            concurrent.futures.wait([self._pending])
            self._pending = None
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)
        if self.rank == 0:
            records = self.log.records("train")
            if records:
                plot_training(records, self.run_dir / "plots", self.cfg.episodes.max_turns)

    def close(self) -> None:
        self._background.shutdown()
        self.executor.close()
        if self.async_queue is not None:
            self.async_queue.close()
        if self.log is not None:
            self.log.close()


def brief(m: dict[str, float]) -> str:
    if "generated_tokens_per_second" in m:
        rollout = (
            f"rollout {m['rollout_seconds']:.1f}s ({m['generated_tokens_per_second']:.0f} tok/s)"
        )
    else:
        rollout = f"waited {m['rollout_seconds']:.1f}s for shards"
    return (
        f"reward {m['reward_mean']:+.3f}, solved {100 * m['success_rate']:.1f}%, "
        f"kl {m.get('kl', 0.0):.4f}, mismatch {m.get('mismatch_max', 0.0):.2e}, "
        f"{rollout}, update {m['update_seconds']:.1f}s"
    )


def summary_table(before: EvalReport | None, after: EvalReport | None) -> str:
    lines = ["| policy | 1@3 | 95% CI | solved by turn 1 / 2 / 3 |", "|---|---|---|---|"]
    for name, report in (("before RLEF", before), ("after RLEF", after)):
        if report is None:
            continue
        row = report.rows[0]
        turns = " / ".join(f"{100 * v:.1f}%" for v in report.solved_by_turn)
        lines.append(
            f"| {name} | {100 * row.mean:.1f}% | [{100 * row.low:.1f}, {100 * row.high:.1f}] "
            f"| {turns} |"
        )
    return "\n".join(lines)


def train(cfg: TrainConfig) -> dict[str, Any]:
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
