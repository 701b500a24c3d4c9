"""Configs: YAML + dotted overrides into typed dataclasses; bad keys and values named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlef_hpc.config import ConfigError, describe, load, to_dict
from rlef_hpc.launch.config import JobConfig, SlurmConfig
from rlef_hpc.train.config import TrainConfig

CONFIGS = Path(__file__).parents[1] / "configs"


def test_demo_config_is_the_embedded_default():
    assert load(TrainConfig, CONFIGS / "demo_cpu.yaml") == TrainConfig()


@pytest.mark.parametrize("name", ["llama3_8b", "llama3_70b"])
def test_shipped_configs_load(name):
    cfg = load(TrainConfig, CONFIGS / f"{name}.yaml")
    assert cfg.model.init == "hf" and cfg.precision.dtype == "bfloat16"
    assert cfg.rollout.rollouts_per_iteration == 1024 and cfg.update.num_minibatches == 4


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_validates_for_the_trainer_and_for_the_launcher(path):
    """rlef-train reads a file as TrainConfig (skipping the launch layer's slurm group);
    tools/submit.py and tools/plan.py as JobConfig, the same groups plus slurm."""
    train, job = load(TrainConfig, path), load(JobConfig, path)
    assert "slurm" not in to_dict(train)
    assert {k: v for k, v in to_dict(job).items() if k != "slurm"} == to_dict(train)
    written = yaml.safe_load(path.read_text())["slurm"]
    assert to_dict(job.slurm) == {**to_dict(SlurmConfig()), **written}


def test_only_the_slurm_group_is_left_to_the_launch_layer():
    extra = {f for f in JobConfig.__dataclass_fields__} - set(TrainConfig.__dataclass_fields__)
    assert extra == TrainConfig.foreign_groups == {"slurm"}
    # The trainer skips the group; anything else unknown is still refused.
    assert load(TrainConfig, None, ["slurm.nodes=2"]) == TrainConfig()
    with pytest.raises(ConfigError, match="unknown key 'slurm.nodez' in slurm; allowed: part"):
        load(JobConfig, None, ["slurm.nodez=2"])


def test_overrides_are_typed_and_nested():
    cfg = load(
        TrainConfig,
        CONFIGS / "llama3_8b.yaml",
        ["ppo.kl_coef=0.02", "optim.lr=1e-6", "optim.betas=[0.9, 0.99]", "run.wandb_project=x"],
    )
    assert cfg.ppo.kl_coef == 0.02 and cfg.optim.lr == 1e-6
    assert cfg.optim.betas == (0.9, 0.99) and cfg.run.wandb_project == "x"
    assert cfg.parallel.tensor == 4  # the file's value, untouched
    assert (
        load(TrainConfig, None, ["episodes.templates.no_code=Nope"]).episodes.templates.no_code
        == "Nope"
    )
    # The resolved config round-trips.
    assert load(TrainConfig, None, []) == TrainConfig()
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.99]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ppo.kl_coeff=0.1"], "unknown key 'ppo.kl_coeff' in ppo; allowed: kl_coef, clip,"),
        (["rollout.max_tokens=many"], "rollout.max_tokens: expected int, got 'many'"),
        (["model.init=gguf"], "model.init: 'gguf' is not one of 'scratch', 'hf'"),
        (["nonsense=1"], "unknown key 'nonsense' in the top level; allowed: run, model,"),
        (["run.dir"], "expected KEY=VALUE"),
        (["rollout.samples_per_problem=5"], "rollout.samples_per_problem=5 must divide"),
        (["ppo.clip=-1"], "ppo.clip must be non-negative"),
        (["run.keep_last=0"], "run.keep_last must be at least 1, got 0"),
        (["run.iterations=-1"], "run.iterations must not be negative, got -1"),
        (["rollout.samples_per_problem=0"], "rollout.samples_per_problem must be at least 1, got"),
        (["update.num_minibatches=0"], "update.num_minibatches must be at least 1, got 0"),
        (["rollout.weights.timeout_s=0"], "rollout.weights.timeout_s must be above 0, got 0.0"),
        (["rollout.temperature=0"], "rollout.temperature must be above 0 for training, got 0.0"),
        (["optim.betas=[0.9, 1.5]"], "optim.betas must each be in [0, 1), got (0.9, 1.5)"),
        (["data.test_problems=-1"], "data.test_problems must not be negative, got -1"),
        (["eval.max_turns=0"], "eval.max_turns must be at least 1, got 0"),
        (["data.curriculum=hard"], "data.curriculum: 'hard' is not one of 'basic', 'feedback'"),
        (
            ["ppo.advantage_normalisation=batch"],
            "ppo.advantage_normalisation: 'batch' is not one of 'turn', 'none'",
        ),
        (["precision.dtype=float8"], "precision.dtype: 'float8' is not one of 'float32', "),
        (["precision.fp8=e5m2"], "precision.fp8: 'e5m2' is not one of 'e4m3', 'hybrid'"),
        (
            ["precision.fp8_recipe=mx"],
            "precision.fp8_recipe: 'mx' is not one of 'delayed', 'tensorwise', 'blockwise'",
        ),
        (["episodes.language=rust"], "episodes.language: 'rust' is not one of 'python', 'cpp'"),
        (["episodes.feedback=fake"], "episodes.feedback: 'fake' is not one of 'real', 'random'"),
        (["rollout.layout=split"], "rollout.layout: 'split' is not one of 'colocated', 'disagg"),
        (["parallel.data=0"], "parallel.data must be at least 1, got 0"),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(TrainConfig, None, overrides)


def test_each_group_checks_its_own_fields_where_it_is_made():
    """A group refuses its bad values itself (naming the key as a config file spells it),
    whoever makes it: the loader, a test, another entry point."""
    from rlef_hpc.rl.optim import OptimConfig
    from rlef_hpc.rollout.config import RolloutConfig, WeightsConfig
    from rlef_hpc.train.config import EvalConfig, RunConfig, UpdateConfig

    for make, message in [
        (lambda: RunConfig(checkpoint_every=0), "run.checkpoint_every must be at least 1, got 0"),
        (lambda: RunConfig(eval_every=3, checkpoint_every=2), "run.eval_every=3 must be a mul"),
        (lambda: UpdateConfig(micro_batch_tokens=0), "update.micro_batch_tokens must be at le"),
        (lambda: RolloutConfig(shard_rollouts=6), "rollout.samples_per_problem=4 must divide"),
        (lambda: WeightsConfig(join_wait_s=-1), "rollout.weights.join_wait_s must not be neg"),
        (lambda: EvalConfig(max_turns=0), "eval.max_turns must be at least 1, got 0"),
        (lambda: OptimConfig(lr=-1.0), "optim.lr must not be negative, got -1.0"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            make()
    assert RunConfig(iterations=0).iterations == 0  # accepted: evaluate the initial policy only


COLOCATED_PP = ["parallel.pipeline=2", "rollout.layout=colocated"]


@pytest.mark.parametrize("cls", [TrainConfig, JobConfig])
def test_the_colocated_layout_refuses_pipeline_parallelism_and_asynchronous_tp(cls):
    """Colocated engines span a tensor-parallel group (any TP the model allows); a pipeline
    stage holds part of the model, and an asynchronous engine at TP > 1 would interleave its
    collectives with the trainer's: both refused, naming the keys."""
    with pytest.raises(ConfigError) as err:
        load(cls, CONFIGS / "demo_cpu.yaml", ["parallel.pipeline=2"])
    assert all(k in str(err.value) for k in COLOCATED_PP), err.value
    with pytest.raises(ConfigError) as err:
        load(cls, CONFIGS / "demo_cpu.yaml", ["parallel.tensor=2", "rollout.asynchronous=true"])
    for key in ("rollout.asynchronous=true", "rollout.layout=colocated", "parallel.tensor=2"):
        assert key in str(err.value), err.value
    assert load(cls, CONFIGS / "demo_cpu.yaml", ["parallel.tensor=2"]).parallel.tensor == 2
    disaggregated = load(
        cls,
        CONFIGS / "demo_cpu.yaml",
        ["parallel.pipeline=2", "rollout.layout=disaggregated", "warmstart.steps=0"],
    )
    assert disaggregated.parallel.pipeline == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tensor=8"], "parallel.tensor=8 must divide model.num_attention_heads=4"),
        (["parallel.pipeline=4"], "parallel.pipeline=4 must divide model.num_layers=2"),
        (["model.num_query_groups=3"], "model.num_query_groups must divide model.num_attention_"),
    ],
)
def test_a_scratch_models_shape_is_checked_against_the_layout(overrides, message):
    disaggregated = ["rollout.layout=disaggregated", "warmstart.steps=0"]
    with pytest.raises(ConfigError, match=message):
        load(TrainConfig, CONFIGS / "demo_cpu.yaml", [*disaggregated, *overrides])


def test_an_hf_models_shape_is_read_from_its_config_json(tmp_path):
    llama = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192,
             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
             "intermediate_size": 28672}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(llama))
    config = CONFIGS / "llama3_70b.yaml"
    assert load(TrainConfig, config, [f"model.hf_dir={tmp_path}"]).parallel.tensor == 8
    with pytest.raises(ConfigError) as err:
        load(
            TrainConfig,
            config,
            [f"model.hf_dir={tmp_path}", "parallel.tensor=16", "parallel.data=16"],
        )
    assert f"model.hf_dir={tmp_path} (its config.json): parallel.tensor=16 must divide " in str(
        err.value
    )
    # Not downloaded yet: nothing to check here (tools/submit.py's preflight names the path).
    assert load(TrainConfig, config, [f"model.hf_dir={tmp_path / 'absent'}"])


def test_help_documents_every_group():
    text = "\n".join(describe(TrainConfig))
    for group in ("run", "model", "parallel", "data", "episodes", "rollout", "ppo", "optim"):
        assert f"\n{group}:" in "\n" + text
    assert "ppo.kl_coef: float = 0.05" in text


def test_cli_rejects_a_typo_with_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "rlef_hpc.train.cli", "ppo.kl_coeff=0.1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'ppo.kl_coeff'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_renamed_key_is_refused_in_one_line_naming_its_new_name(tmp_path):
    """data.eval_problems (it counted valid problems) is data.valid_problems now."""
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  eval_problems: 8\n")
    for args in ([str(old)], ["data.eval_problems=8"]):
        proc = subprocess.run(
            [sys.executable, "-m", "rlef_hpc.train.cli", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "'data.eval_problems' is now 'data.valid_problems'" in proc.stderr
    assert load(TrainConfig, None, ["data.valid_problems=8"]).data.valid_problems == 8


def test_cli_refuses_a_colocated_pipeline_parallel_run_before_writing_anything(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "rlef_hpc.train.cli", str(CONFIGS / "demo_cpu.yaml"),
         "parallel.pipeline=2", f"run.dir={run}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("rlef-train: error:")
    assert all(k in proc.stderr for k in COLOCATED_PP), proc.stderr
    assert not run.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["precision.dtype=bfloat16", "precision.fp8=e4m3"],
            "rlef-train: error: precision.fp8 needs a GPU with compute capability >= 8.9",
        ),
        (["rollout.quantization=fp8"], "rlef-train: error: rollout.quantization=fp8 needs a GPU"),
        (["parallel.data=2"], "error: 1 processes, but parallel.tensor x pipeline x data = 2"),
        (
            ["data.train_problems=400"],
            "rlef-train: error: data.train_problems=400: cannot draw 400 distinct train problems",
        ),
    ],
    ids=["fp8", "engine-fp8", "world-size", "too-many-problems"],
)
def test_cli_refuses_what_this_machine_or_launch_cannot_run_before_building(
    tmp_path, overrides, message
):
    """What only the machine or the launch can tell (no FP8 GPU here; one process for a layout
    of two), or only drawing the problems (more than the synthetic families hold), is one line
    and exit 2 before anything is built or written, as a bad key is."""
    if any("fp8" in o for o in overrides) and torch_cuda_capability() >= (8, 9):
        pytest.skip("this machine has an FP8 GPU")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "rlef_hpc.train.cli", str(CONFIGS / "demo_cpu.yaml"),
         *overrides, f"run.dir={run}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr
    assert not run.exists()


def torch_cuda_capability() -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def test_rollout_worker_refuses_fp8_without_an_fp8_gpu_before_waiting(tmp_path):
    """It used to wait for the trainer's weights (up to rollout.shard_timeout_s) and refuse
    only when it built its engine."""
    if torch_cuda_capability() >= (8, 9):
        pytest.skip("this machine has an FP8 GPU")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "rlef_hpc.train.rollout_worker", str(CONFIGS / "demo_cpu.yaml"),
         "0", "rollout.layout=disaggregated", "rollout.quantization=fp8", f"run.dir={run}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("rlef-rollout-worker: error: rollout.quantization=fp8 needs")
    assert proc.stderr.count("\n") == 1 and not run.exists()
