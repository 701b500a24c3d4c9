"""The process-wide state this project sets, by explicit calls at the start of each entry point:
rlef-train, rlef-eval, the rollout worker, the Slurm jobs (launch/jobs.py), tools/,
benchmarks/ and the test scripts (tests/conftest.py for in-process tests). Nothing else in the
package changes the environment or patches torch, at import or as a side effect of another
call (the sandbox server, a process of its own, empties its own environment).

    from rlef_hpc import logs, runtime

    def main() -> int:
        runtime.setup()  # first: before anything imports torch
        ...  # parse the command line, refuse what cannot run
        logs.setup(...)  # where the libraries' warnings go
        runtime.setup_megatron()  # where megatron models are built: its import warns
        ...

`setup()`, the process's environment:
- TORCH_CPP_LOG_LEVEL=ERROR (unless set): torch's and vLLM's C++ warnings ("NUMA binding")
  print straight to stderr, out of reach of the log file (rlef_hpc.logs). Torch reads it once,
  as it loads: call setup() before anything imports torch, or the C++ level stays torch's.
- VLLM_CONFIGURE_LOGGING=0 (unless set): vLLM's records propagate to the log file's handler
  instead of a console handler of its own; vLLM reads it when imported.
- VLLM_ENABLE_V1_MULTIPROCESSING=0 (unless set): engines run in this process, where a refit
  hands them tensors by reference (a multiprocess engine cannot take them) and where the CPU
  engine starts in ~2 s rather than ~15 s; vLLM reads it when an engine starts.
- srun's task variables as torch.distributed's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT; rlef_hpc.dist_env.torch_env_from_slurm), where no launcher set them: vLLM's
  external launcher (a colocated engine per trainer rank) reads RANK and LOCAL_RANK from the
  environment (torch.distributed takes them from rlef_hpc.dist_env.rendezvous either way).

`setup_megatron()`, where CUDA is absent: megatron-core's CPU shims, which patch a few megatron
modules and `torch.Tensor.type` for this process (rlef_hpc.models.megatron_compat); every
megatron model, optimizer and schedule needs them on a CPU (build_gpt and seed refuse to run
without them), and with CUDA it does nothing. A call of its own because importing megatron
takes seconds and warns (no TE, no apex): after logs.setup, and only where megatron runs.
Both are idempotent.
"""

from __future__ import annotations

import os

# What this project sets, when the process has not set it itself (see the module docstring).
ENVIRONMENT = {
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "VLLM_CONFIGURE_LOGGING": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def setup() -> None:
    """This process's environment, as the module docstring lists; call it first."""
    from rlef_hpc.dist_env import torch_env_from_slurm  # imports no torch

    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if "RANK" not in os.environ:  # a launcher's own (torchrun's) come first
        os.environ.update(torch_env_from_slurm(os.environ))


def setup_megatron() -> None:
    """megatron-core's CPU shims, where CUDA is absent (see the module docstring)."""
    from rlef_hpc.models import megatron_compat

    megatron_compat.install()
