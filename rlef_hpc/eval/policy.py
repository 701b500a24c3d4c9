"""A Hugging Face model's episodes on one vLLM engine, for the evaluator (rlef_hpc.eval.evaluator):
what rlef-eval --model and the Slurm evaluation job generate with. The job evaluates a run's
checkpoints one after another on one engine (ModelEvaluator). Also the report files of
rlef-eval and the job's feedback comparison."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from rlef_hpc.episodes import EpisodeConfig
from rlef_hpc.eval.evaluator import DrawResult, Generate, episode_generate
from rlef_hpc.eval.plots import plot_solve_rate
from rlef_hpc.rollout.config import RolloutConfig
from rlef_hpc.rollout.vllm_engine import build_engine
from rlef_hpc.sandbox import Executor


def write_outputs(out: Path, results: Mapping[str, DrawResult], max_turns: int) -> None:
    """report.json, report.md, trajectories.jsonl and solve_rate.png of each feedback mode's
    draw in `out`, or with several modes in `out`/MODE/ each."""
    for mode, result in results.items():
        where = out / mode if len(results) > 1 else out
        where.mkdir(parents=True, exist_ok=True)
        (where / "report.json").write_text(json.dumps(result.report.to_json(), indent=2))
        (where / "report.md").write_text(result.report.table() + "\n")
        with open(where / "trajectories.jsonl", "w") as f:
            for t in result.trajectories:
                f.write(json.dumps(asdict(t)) + "\n")
        title = f"{mode} feedback"
        plot_solve_rate(result.trajectories, where / "solve_rate.png", max_turns, title=title)
        print(f"wrote {where}/report.json, report.md, trajectories.jsonl, solve_rate.png")


def hf_dir_weights(model_dir: str) -> Iterator[tuple[str, Any]]:
    """The HF-named tensors of a Hugging Face model directory, one at a time (what an engine
    reloads in place; module-level, so that vLLM's worker processes can unpickle it)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights")
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # safe_open is not a mapping
                yield name, f.get_tensor(name)


class ModelEvaluator:
    """Episodes of a sequence of models of one architecture (a run's checkpoints) on one vLLM
    engine: built over the first model, each next one's weights reloaded into it in place,
    since restarting an engine per checkpoint costs minutes and may not return its GPU
    memory. `generator()` is the evaluator's Generate over the model loaded."""

    def __init__(
        self, rollout: RolloutConfig, episodes: EpisodeConfig, executor: Executor, seed: int
    ) -> None:
        # The model's own numbers, not a quantised engine's: rollout.quantization is for training.
        self.rollout = replace(rollout, quantization="none")
        self.episode_config, self.executor, self.seed = episodes, executor, seed
        self.engine: Any = None
        self.tokenizer: Any = None

    def load(self, model_dir: str | Path) -> None:
        if self.engine is None:
            from transformers import AutoTokenizer  # heavy: only when a model is evaluated

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            tp = self.rollout.tensor_parallel
            self.engine = build_engine(str(model_dir), self.rollout, self.seed, tensor_parallel=tp)
        else:
            self.engine.update_weights_from(partial(hf_dir_weights, str(model_dir)))

    def generator(self, config: EpisodeConfig | None = None) -> Generate:
        """A Generate over the loaded model with these episodes (default: the evaluator's):
        all episodes at once through the engine (the runner batches every pending turn)."""

        def sampler(temperature: float, top_p: float) -> Any:
            return partial(self.engine, temperature=temperature, top_p=top_p)

        config = config or self.episode_config
        return episode_generate(self.tokenizer, self.executor, sampler, config, self.seed)
