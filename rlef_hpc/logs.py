"""Where a process's output goes. The terminal (stdout/stderr) gets what a user reads: progress,
one line per iteration, the result table, errors. Everything else, the libraries' logging
(vLLM's engine and refit messages, megatron, transformers) and Python warnings (deprecations,
"Apex is not installed"), goes to `run_dir/logs/<name>.log`; `--verbose` also shows it live.

Set up at the start of each entry point (rlef-train, the rollout worker, rlef-eval), after
rlef_hpc.runtime.setup(), which tells vLLM not to configure console logging of its own and
lowers the C++ warnings that bypass Python logging to errors (TORCH_CPP_LOG_LEVEL, unless set;
WARNING shows them).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def process_name(kind: str) -> str:
    """`kind`, with the rank under a multi-process launch (train, train-rank3)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return kind if rank == "0" else f"{kind}-rank{rank}"


def setup(log_dir: Path, name: str, verbose: bool = False) -> Path:
    """Routes logging and warnings of this process into `log_dir/name.log` (appended: a
    resumed run keeps its history), and to stderr too when `verbose`. Returns the file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.log"
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    _adopt_console_loggers()
    try:  # transformers logs through a console handler of its own unless told otherwise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    except ImportError:
        pass
    return path


def _adopt_console_loggers() -> None:
    """Libraries that gave their loggers console handlers of their own (torch's "Triton not
    available", for one) log through ours instead: handlers dropped, records propagated."""
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    for logger in list(logging.root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue
        for handler in logger.handlers[:]:
            if isinstance(handler, logging.StreamHandler) and handler.stream in consoles:
                logger.removeHandler(handler)
                logger.propagate = True
