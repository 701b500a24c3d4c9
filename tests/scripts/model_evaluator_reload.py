"""ModelEvaluator (the evaluation job's engine) loads a second model of the same shape in place:
afterwards its log-probs are the second model's as transformers computes them, not the
first's. Prints `FIRST d1`, `SECOND d2` (max |engine - transformers| log-prob gaps against the
model loaded) and `STALE d3` (the gap between the two models: the check is not vacuous).

    python tests/scripts/model_evaluator_reload.py WORK_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from rlef_hpc.episodes import EpisodeConfig
from rlef_hpc.eval.policy import ModelEvaluator
from rlef_hpc.models.tokenizer import build_tokenizer
from rlef_hpc.rollout.config import RolloutConfig
from tests.helpers import save_random_llama


def transformers_logprobs(model_dir: Path, sequence: list[int]) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float()
    picked = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(sequence[1:])[:, None])
    return torch.cat([torch.zeros(1), picked[:, 0]])


def main(work: Path) -> None:
    tokenizer = build_tokenizer(["def f(x):\n    return x + 1\nprint(f(2))\n"] * 50, 256)
    # head_dim 32: what vLLM's CPU attention supports
    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    first = save_random_llama(work / "first", tokenizer, num_key_value_heads=2, **shape)
    # The same random model (save_random_llama seeds 0), then every weight perturbed.
    second = save_random_llama(work / "second", tokenizer, num_key_value_heads=2, **shape)
    from safetensors.torch import load_file, save_file

    weights = load_file(second / "model.safetensors")
    save_file({n: t + 0.05 * torch.randn_like(t) for n, t in weights.items()},
              second / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    sequence = tokenizer("def f(x):\n    return x + 1\n")["input_ids"]
    evaluator = ModelEvaluator(
        RolloutConfig(kv_cache_gib=0.25, max_tokens=8), EpisodeConfig(), executor=None, seed=0
    )
    evaluator.load(first)
    engine_first = torch.tensor(evaluator.engine.sequence_logprobs([sequence])[0])
    evaluator.load(second)  # in place: no new engine
    engine_second = torch.tensor(evaluator.engine.sequence_logprobs([sequence])[0])
    reference_first = transformers_logprobs(first, sequence)
    reference_second = transformers_logprobs(second, sequence)
    print("FIRST", float((engine_first - reference_first).abs().max()))
    print("SECOND", float((engine_second - reference_second).abs().max()))
    print("STALE", float((reference_first - reference_second).abs().max()))


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    main(Path(sys.argv[1]))
