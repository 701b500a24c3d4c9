"""What a user sees and what goes to the run's log file (rlef_hpc.logs, rlef_hpc.progress)."""

from __future__ import annotations

import logging
import warnings

import pytest

from rlef_hpc import logs
from rlef_hpc.progress import LineProgress, progress_bar


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers[:]:
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def _noise() -> None:
    from transformers.utils import logging as hf_logging

    warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning, stacklevel=1)
    logging.getLogger("vllm.model_executor.model_loader").warning(
        "RotaryEmbedding: Failed to load weights"
    )
    hf_logging.get_logger("transformers.tokenization_utils").warning("a tokenizer warning")


@pytest.mark.parametrize("verbose", [False, True])
def test_library_logs_and_warnings_go_to_the_file_and_live_only_when_verbose(
    tmp_path, capfd, restore_logging, verbose
):
    path = logs.setup(tmp_path / "logs", "train", verbose)
    _noise()
    print("iteration 1/3: reward 0.5")  # what the user reads
    for h in logging.getLogger().handlers:
        h.flush()
    text = path.read_text()
    for line in ("Apex is not installed", "Failed to load weights", "a tokenizer warning"):
        assert line in text
    out, err = capfd.readouterr()
    assert out == "iteration 1/3: reward 0.5\n"
    for line in ("Apex is not installed", "Failed to load weights", "a tokenizer warning"):
        assert (line in err) == verbose, err


def test_a_log_file_per_rank(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert logs.process_name("train") == "train"
    monkeypatch.setenv("RANK", "3")
    assert logs.process_name("train") == "train-rank3"


def test_progress_off_a_terminal_is_one_line_per_phase(capfd):
    """Not a terminal (pytest's capture, a pipe, Slurm's output file): no carriage-return
    frames, one line when the phase ends."""
    bar = progress_bar(range(5), desc="update", unit="minibatch")
    assert isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix(loss="0.123")
    with progress_bar(total=3, desc="episodes", unit="ep") as episodes:
        for _ in range(3):
            episodes.update()
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("update: 5/5 minibatch in ") and lines[0].endswith("(loss=0.123)")
    assert lines[1].startswith("episodes: 3/3 ep in ")
