"""Sampling options of the vLLM engine, printed as JSON (test_refit runs it).

python tests/scripts/sampling_options.py HF_DIR SEED
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    from rlef_hpc.rollout.vllm_engine import SamplingConfig, VLLMGenerator

    hf_dir, seed = sys.argv[1], int(sys.argv[2])
    engine = VLLMGenerator(hf_dir, SamplingConfig(temperature=1.0, max_tokens=6, seed=seed))
    eot = engine.llm.get_tokenizer().eos_token_id
    prompts = [[5, 9, 13, 17]] * 4
    sampled = [g.tokens for g in engine(prompts)]
    engine.params.logit_bias = {eot: 100.0}  # end of turn at once
    stopped = [g.tokens for g in engine(prompts[:1])]
    engine.params.logit_bias = None
    engine.params.top_p = 1e-6  # only the most likely token survives
    nucleus = [g.tokens for g in engine(prompts[:2])]
    engine.params.temperature = 0.0
    greedy = [g.tokens for g in engine(prompts[:1])]
    print(
        "JSON"
        + json.dumps(
            {
                "sampled": sampled,
                "stopped": stopped,
                "eot": eot,
                "nucleus": nucleus,
                "greedy": greedy,
            }
        )
    )


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    main()
