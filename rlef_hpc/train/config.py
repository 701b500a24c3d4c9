"""The training run's config: one typed dataclass per group, YAML files in configs/."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from rlef_hpc.config import require_at_least
from rlef_hpc.episodes.runner import EpisodeConfig
from rlef_hpc.eval.protocol import MetricSpec, min_rollouts
from rlef_hpc.models.config import ModelConfig, ParallelConfig, PrecisionConfig, validate_layout
from rlef_hpc.rl.optim import OptimConfig
from rlef_hpc.rl.ppo import PPOConfig
from rlef_hpc.rollout.config import RolloutConfig, validate_rollout_hardware


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives, how long it runs, how often it evaluates and checkpoints."""

    dir: str = "runs/demo_cpu"
    seed: int = 0
    iterations: int = 25
    eval_every: int = 0  # iterations; 0: only before and after training
    # Iterations between checkpoints (and always at the end, and on SIGTERM/SIGUSR1): at 1, a
    # SIGKILL loses at most the iteration in progress (with async_save, also the one before it
    # if its checkpoint was still being written in the background).
    checkpoint_every: int = 1
    keep_last: int = 2
    async_save: bool = False
    tensorboard: bool = True
    wandb_project: str | None = None  # log to Weights & Biases too (needs `wandb`)

    def __post_init__(self) -> None:
        require_at_least("run", self, iterations=0, eval_every=0, checkpoint_every=1, keep_last=1)
        # A due evaluation needs its checkpoint: the evaluation worker reads it, retention keeps
        # it, and the selected one is exported from it.
        if self.eval_every % self.checkpoint_every:
            raise ValueError(
                f"run.eval_every={self.eval_every} must be a multiple of "
                f"run.checkpoint_every={self.checkpoint_every}: each evaluated iteration needs "
                "its checkpoint"
            )


@dataclass(frozen=True)
class ModelInitConfig:
    """Where the initial policy comes from (the `model` group): a Hugging Face Llama directory,
    or a tiny Llama built from scratch in the shape given here. (ModelConfig, in models/, is
    the architecture itself, read from the resulting HF directory.)"""

    init: Literal["scratch", "hf"] = "scratch"
    hf_dir: str | None = None  # init=hf: weights, config and tokenizer (Llama-3.1-Instruct)
    # init=scratch: the shape of the model, and its byte-level BPE vocabulary
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 384
    tokenizer_vocab: int = 640
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        if self.init == "hf" and not self.hf_dir:
            raise ValueError("model.init=hf needs model.hf_dir (a Hugging Face Llama directory)")
        require_at_least(
            "model",
            self,
            hidden_size=1,
            num_layers=1,
            num_attention_heads=1,
            num_query_groups=1,
            ffn_hidden_size=1,
            tokenizer_vocab=1,
            max_position_embeddings=1,
        )

    def scratch_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=10000.0,
        )

    def known_shape(self) -> ModelConfig | None:
        """The shape as far as the config knows it before the run starts. init=scratch: these
        fields, at the vocabulary asked for (rounded up to even, as the trainer pads its trained
        tokenizer's, which may come out smaller: build_gpt checks the one it builds). init=hf:
        hf_dir/config.json, or None while it is not there (tools/submit.py's preflight reports
        a missing hf_dir; rlef-train fails to read it)."""
        if self.init == "scratch":
            return self.scratch_config(self.tokenizer_vocab + self.tokenizer_vocab % 2)
        config = Path(self.hf_dir) / "config.json" if self.hf_dir else None
        return ModelConfig.from_hf(config) if config and config.is_file() else None


@dataclass(frozen=True)
class DataConfig:
    """Training and evaluation problems."""

    source: Literal["synthetic", "codecontests"] = "synthetic"
    train_path: str | None = None  # codecontests: JSONL or parquet of the train split
    valid_path: str | None = None  # codecontests: the valid split (selection)
    test_path: str | None = None  # codecontests: the test split (the reported numbers)
    train_problems: int = 160  # synthetic: instances drawn from the train split
    # synthetic: the draw of the problems and their tests (train, valid and test), apart from
    # run.seed: runs of different seeds train and are measured on the same problems.
    seed: int = 0
    # synthetic: "feedback" adds problems only the feedback can solve (the ablations' bench)
    curriculum: Literal["basic", "feedback"] = "basic"
    valid_problems: int = 20  # valid problems (synthetic: from the held-out split)
    # Test problems: synthetic, the held-out instances after the valid ones; codecontests, the
    # first this many of test_path, 0 for all of them (the paper configs).
    test_problems: int = 21  # the demo's: with its 20 valid, all 41 held-out (basic)
    renamed_keys: ClassVar[dict[str, str]] = {"eval_problems": "valid_problems"}

    def __post_init__(self) -> None:
        if self.source == "codecontests" and not self.train_path:
            raise ValueError("data.source=codecontests needs data.train_path")
        require_at_least("data", self, train_problems=1, valid_problems=0, test_problems=0)


@dataclass(frozen=True)
class UpdateConfig:
    """How each iteration's rollouts become optimizer steps."""

    num_minibatches: int = 2  # the paper: 4 updates of 256 from 1024 rollouts
    # A minibatch's rows are sorted by length and cut into micro-batches of at most this many
    # tokens (rows x padded length; a longer row runs alone), each padded to its own longest
    # (rlef_hpc.rl.batching).
    micro_batch_tokens: int = 4096

    def __post_init__(self) -> None:
        require_at_least("update", self, num_minibatches=1, micro_batch_tokens=1)


@dataclass(frozen=True)
class WarmStartConfig:
    """Supervised pass on reference solutions before RL (init=scratch: so RL has a start)."""

    steps: int = 0
    batch_size: int = 16
    lr: float = 3e-3
    # Updates over which the learning rate rises linearly to `lr` (then decays to a tenth).
    warmup_steps: int = 10
    # Copies of each problem's demonstration with a near-miss solution (a constant off by
    # one): a warm-started policy that often answers almost right, as RL's starting point.
    near_misses: int = 0
    # Copies of each problem's repair demonstration (near miss, its real feedback, then the
    # solution): a policy that has seen feedback used, which RL can then reinforce.
    repairs: int = 0
    # Steps between looks at the loss of the valid problems' reference solutions (and one after
    # the last): the policy kept is the one where it was lowest. 0: the last step's.
    select_every: int = 0

    def __post_init__(self) -> None:
        require_at_least(
            "warmstart",
            self,
            steps=0,
            batch_size=1,
            lr=0,
            warmup_steps=1,
            near_misses=0,
            repairs=0,
            select_every=0,
        )


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol (rlef_hpc.eval.protocol): on every evaluation set (data.valid,
    data.test, the `transfer` files), each metric from rollouts sampled as it says, one set of
    `rollouts_per_problem` rollouts per distinct sampling; the checkpoint with the best
    `select_metric` on valid is the run's result. The paper's: 1@3 at temperature 0.2, 10@100
    at 1.0 and top-p 0.95, 200 rollouts per problem, selection by 1@3."""

    rollouts_per_problem: int = 4
    # Turns of an evaluation episode, always with the real feedback, however training runs its
    # episodes (episodes.max_turns, episodes.feedback): every run is measured the same way.
    max_turns: int = 3
    # The demo's: 4 rollouts buy 10@12 as the stand-in for 10@100 (which needs 33).
    metrics: tuple[MetricSpec, ...] = (
        MetricSpec("1@3", 0.2, 0.95),
        MetricSpec("10@12", 1.0, 0.95),
    )
    select_metric: str = "1@3"  # one of `metrics`: the checkpoint kept and exported to best/
    # HumanEval+/MBPP+-style function problems (JSON lines with an entry_point), each an
    # evaluation set named after its file: the transfer the paper reports.
    transfer: tuple[str, ...] = ()
    # The evaluation job's feedback modes (eval.feedback=[real,random,none]): the same episodes
    # once per mode, a report each. The trainer's own evaluations use the real feedback only.
    feedback: tuple[Literal["real", "random", "none"], ...] = ("real",)

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"eval.max_turns must be at least 1, got {self.max_turns}")
        if not self.feedback or len(set(self.feedback)) != len(self.feedback):
            raise ValueError(f"eval.feedback must name distinct modes, got {self.feedback}")
        names = [m.name for m in self.metrics]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"eval.metrics must name distinct metrics, got {names}")
        if self.select_metric not in names:
            raise ValueError(
                f"eval.select_metric={self.select_metric} is not one of eval.metrics {names}"
            )
        needed = min_rollouts(self.metrics, self.max_turns)
        if self.rollouts_per_problem < needed:
            raise ValueError(
                f"eval.rollouts_per_problem={self.rollouts_per_problem} cannot estimate "
                f"eval.metrics {names}: they need {needed} rollouts per problem at "
                f"eval.max_turns={self.max_turns}"
            )


@dataclass(frozen=True)
class TrainConfig:
    # The demo's checkpoints are written in the background, during the next iteration's
    # episodes: the saves are off the critical path of a run that saves every iteration.
    run: RunConfig = field(default_factory=lambda: RunConfig(async_save=True))
    model: ModelInitConfig = field(default_factory=ModelInitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    episodes: EpisodeConfig = field(default_factory=lambda: EpisodeConfig(deterministic=True))
    # Two sandbox processes judge an iteration's programs side by side on the demo's two
    # cores while the engine waits (episodes.deterministic: the same episodes as with one).
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(sandbox_workers=2))
    ppo: PPOConfig = field(default_factory=PPOConfig)
    # The demo's tiny model from scratch moves at a far larger step than the paper's 2e-7 for 8B.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=3))
    update: UpdateConfig = field(default_factory=UpdateConfig)
    # The demo's: a policy that answers in form, right or almost right (see near_misses).
    warmstart: WarmStartConfig = field(
        default_factory=lambda: WarmStartConfig(
            steps=400, batch_size=16, warmup_steps=40, near_misses=1, select_every=50
        )
    )
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Groups of the same YAML files that a layer above owns: `slurm`, the launch layer's
    # (rlef_hpc.launch.config.JobConfig). rlef-train runs configs/*.yaml inside sbatch jobs
    # and train must not import launch, so the loader skips these groups rather than refusing
    # them; JobConfig, which has `slurm` as a field, reads and validates it.
    foreign_groups: ClassVar[frozenset[str]] = frozenset({"slurm"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The rules between groups, naming the keys (each group checks its own fields as it
        is made, in its __post_init__). What can be checked without a model or a process
        group, so that a bad config is refused before anything is written or submitted: every
        load() of a config (rlef-train, tools/submit.py, tools/plan.py, the rollout worker,
        the jobs) runs it. JobConfig (rlef_hpc.launch.config) extends it with the Slurm
        allocation's checks; what only the machine can tell is check_machine's."""
        r, u, p = self.rollout, self.update, self.parallel
        if r.layout == "colocated" and p.pipeline != 1:
            raise ValueError(
                f"parallel.pipeline={p.pipeline} with rollout.layout=colocated: a colocated "
                "engine spans one tensor-parallel group of the trainer and holds the whole "
                "model, which a pipeline stage does not; use rollout.layout=disaggregated "
                "(rollout workers of their own) for pipeline-parallel training"
            )
        if r.layout == "colocated" and p.tensor > 1 and r.asynchronous:
            raise ValueError(
                f"rollout.asynchronous=true with rollout.layout=colocated at parallel.tensor="
                f"{p.tensor}: the engine would generate over its tensor-parallel group while "
                "the trainer's collectives run over the same ranks and devices, in no agreed "
                "order (on GPUs, a deadlock); set rollout.asynchronous=false, or "
                "rollout.layout=disaggregated"
            )
        self._validate_shape()
        if r.temperature <= 0:
            raise ValueError(
                f"rollout.temperature must be above 0 for training, got {r.temperature}: the "
                "update takes the sampled tokens' log-probs at it"
            )
        per_rank = r.rollouts_per_iteration // p.data
        if r.rollouts_per_iteration % p.data or per_rank % u.num_minibatches:
            raise ValueError(
                f"rollout.rollouts_per_iteration={r.rollouts_per_iteration} must split over "
                f"parallel.data={p.data} ranks into update.num_minibatches={u.num_minibatches} "
                "minibatches"
            )
        if self.warmstart.steps and p.pipeline > 1:
            raise ValueError(
                f"warmstart.steps={self.warmstart.steps} with parallel.pipeline={p.pipeline}: "
                "the warm start runs without pipeline stages; set warmstart.steps=0 (start "
                "from an instruct model, model.init=hf) or warm-start at parallel.pipeline=1"
            )

    def _validate_shape(self) -> None:
        """The model's shape, where the config knows it, against parallel.tensor/pipeline. From
        config.json (init=hf), the numbers are not this config's keys: say where they are."""
        m = self.model
        where = "" if m.init == "scratch" else f"model.hf_dir={m.hf_dir} (its config.json): "
        try:
            shape = m.known_shape()
            if shape is not None:
                validate_layout(shape, self.parallel)
        except KeyError as e:
            raise ValueError(f"{where}no {e} field") from None
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None


def check_machine(cfg: TrainConfig) -> None:
    """What only the machine can tell, for a trainer process about to start here: FP8 training
    (precision.fp8) against this GPU and Transformer Engine, and the engine's FP8
    (rollout.quantization) where the trainer runs the engine (the colocated layout; a rollout
    worker checks its own). Raises ValueError naming the key. The entry points call it before
    anything is built or written; build_gpt and build_engine check again as they build."""
    from rlef_hpc.models.config import compute_capability, validate_hardware
    from rlef_hpc.models.gpt import available_kernels

    capability = compute_capability()
    validate_hardware(cfg.precision, capability, available_kernels().te)
    if cfg.rollout.layout == "colocated":
        validate_rollout_hardware(cfg.rollout, capability)
