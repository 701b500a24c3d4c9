"""Configs: YAML + dotted overrides into typed dataclasses; bad keys and values named."""

from __future__ import annotations

import json
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
        (["run.keep_last=0"], "run.keep_last must be positive"),
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
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load(TrainConfig, None, overrides)


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
