"""The process-wide state (environment variables, torch and megatron patches) is set by
rlef_hpc.runtime at the entry points, explicitly: no module changes it when imported or as a
side effect of another call."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import rlef_hpc
from tests.helpers import TESTS_DIR

PACKAGE = Path(rlef_hpc.__file__).parent
# Where the process's state may be changed: the set-up itself, the megatron shims it installs,
# the sandbox server emptying its own environment (a process of its own, isolating itself),
# and the weight bus's NCCL settings, set around the construction of its own groups and put
# back (torch reads TORCH_NCCL_BLOCKING_WAIT from the environment only, per group).
ALLOWED = {
    "runtime.py",
    "models/megatron_compat.py",
    "sandbox/isolation.py",
    "rollout/bus.py",
}
ENVIRON_WRITES = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def writes_process_state(tree: ast.AST) -> list[str]:
    """The lines of `tree` that write os.environ (or call putenv/unsetenv) or assign an
    attribute of torch (torch.X = ..., torch.Tensor.X = ...)."""

    def dotted(node: ast.AST) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return f"{dotted(node.value)}.{node.attr}"
        return ""

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, name = dotted(node.func.value), node.func.attr
            if owner == "os.environ" and name in ENVIRON_WRITES or name in ("putenv", "unsetenv"):
                found.append(f"{node.lineno}: {owner}.{name}()")
        targets = []
        if isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
        for target in targets:
            where = dotted(target.value if isinstance(target, ast.Subscript) else target)
            if where == "os.environ" or where.startswith("torch."):
                found.append(f"{target.lineno}: {where} written")
    return found


def test_only_the_runtime_set_up_changes_the_environment_or_patches_torch():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        found = writes_process_state(ast.parse(path.read_text()))
        if found and name not in ALLOWED:
            offenders[name] = found
    assert not offenders, offenders


def test_the_check_sees_what_it_looks_for():
    code = (
        "import os, torch\nos.environ['A'] = '1'\nos.environ.setdefault('B', '2')\n"
        "torch.Tensor.type = None\ndel os.environ['C']\n"
    )
    assert len(writes_process_state(ast.parse(code))) == 4


def python_json(code: str, env: dict[str, str] | None = None) -> dict:
    """`code` run by a Python process of its own; the JSON line it printed last."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=TESTS_DIR.parent,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


IMPORT_EVERYTHING = """
import importlib, json, os, pkgutil, sys
import torch
import rlef_hpc

# Every write to os.environ, with the module that made it (libraries set their own: torch's
# inductor its cache directory as megatron imports it).
writers = []
environ = type(os.environ)
real_set, real_del = environ.__setitem__, environ.__delitem__

def writer():
    frame = sys._getframe(2)
    while frame.f_globals.get("__name__") in ("os", "_collections_abc"):
        frame = frame.f_back
    return frame.f_globals.get("__name__")

def setitem(self, key, value):
    writers.append((writer(), key))
    real_set(self, key, value)

def delitem(self, key):
    writers.append((writer(), key))
    real_del(self, key)

environ.__setitem__, environ.__delitem__ = setitem, delitem
tensor_type = torch.Tensor.type
skip = {"rlef_hpc.sandbox.child"}  # runs as a program (the sandbox's child), not imported
for module in pkgutil.walk_packages(rlef_hpc.__path__, "rlef_hpc."):
    if module.name not in skip:
        importlib.import_module(module.name)
ours = sorted({f"{m}: {k}" for m, k in writers if m and m.startswith("rlef_hpc")})
patched = torch.Tensor.type is not tensor_type
print(json.dumps({"ours": ours, "writes seen": len(writers), "patched": patched}))
"""


def test_importing_every_module_changes_nothing():
    import os

    from rlef_hpc.runtime import ENVIRONMENT

    # As a process that has not set itself up (this one has: tests/conftest.py).
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    result = python_json(IMPORT_EVERYTHING, env)
    assert result["writes seen"] > 0  # the tracing works: torch's inductor sets its cache dir
    assert (result["ours"], result["patched"]) == ([], False), result


MEGATRON_WITHOUT_SET_UP = """
import json, torch
from rlef_hpc.models.megatron_compat import seed
tensor_type = torch.Tensor.type
try:
    seed(0)
    error = None
except RuntimeError as e:
    error = str(e)
print(json.dumps({"error": error, "patched": torch.Tensor.type is not tensor_type}))
"""


def test_megatron_on_a_cpu_without_the_set_up_is_refused_not_patched_in():
    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA megatron needs no shims")
    result = python_json(MEGATRON_WITHOUT_SET_UP)
    assert not result["patched"]
    assert "rlef_hpc.runtime.setup_megatron()" in (result["error"] or ""), result


def test_building_an_engine_leaves_the_environment_alone(monkeypatch, tmp_path):
    import os

    from rlef_hpc.rollout import vllm_engine
    from rlef_hpc.rollout.config import RolloutConfig

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setattr(vllm_engine, "VLLMGenerator", lambda *args, **kwargs: "engine")
    before = dict(os.environ)
    assert vllm_engine.build_engine(str(tmp_path), RolloutConfig(), 0) == "engine"
    assert dict(os.environ) == before


def test_each_slurm_job_drops_the_submitting_shells_rendezvous(tmp_path):
    """Rather than submit() removing MASTER_ADDR/MASTER_PORT from its own process."""
    from rlef_hpc.config import load
    from rlef_hpc.launch.config import JobConfig
    from rlef_hpc.launch.submit import sbatch_scripts

    cfg = load(
        JobConfig,
        TESTS_DIR.parent / "configs" / "demo_cpu.yaml",
        [f"run.dir={tmp_path}", "rollout.layout=disaggregated"],
    )
    scripts = sbatch_scripts(cfg)
    assert set(scripts) == {"train", "rollout", "eval"}
    for job, script in scripts.items():
        setup, command = script.index("unset MASTER_ADDR MASTER_PORT"), script.index("srun")
        assert setup < command, job


def test_the_set_up_adopts_sruns_variables_and_keeps_a_launchers(monkeypatch):
    import os

    from rlef_hpc import runtime

    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}
    slurm |= {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that what setup() sets is undone after
        monkeypatch.delenv(key)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    runtime.setup()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]) == (
        "3",
        "1",
        "n1",
    )
    monkeypatch.setenv("RANK", "0")  # torchrun's
    monkeypatch.setenv("SLURM_PROCID", "2")
    runtime.setup()
    assert os.environ["RANK"] == "0"
