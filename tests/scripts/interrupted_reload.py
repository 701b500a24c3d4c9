"""An engine (vLLM, in this process) whose in-place reloads fail part-way, as a weight bus
round lost with a peer does: each failure leaves the engine able to take the next reload,
which then gives exactly the weights it streamed. Prints one JSON line: per case, the largest
log-prob difference to transformers' on the weights expected.

    python tests/scripts/interrupted_reload.py HF_DIR
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    from transformers import AutoModelForCausalLM

    from rlef_hpc.rollout.vllm_engine import SamplingConfig, VLLMGenerator

    hf_dir = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    sequences = [[(i * 7 + j * 3) % 200 + 3 for j in range(12)] for i in range(3)]

    def reference() -> torch.Tensor:  # transformers' log p(token_i | tokens_<i), i >= 1
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor(sequences)).logits.float(), -1)
        return logp[:, :-1].gather(-1, torch.tensor(sequences)[:, 1:, None])[..., 0]

    original = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}
    expected = {"original": reference()}
    model.load_state_dict(moved)
    expected["moved"] = reference()

    engine = VLLMGenerator(hf_dir, SamplingConfig(max_tokens=4))

    def diff(to: str) -> float:
        got = torch.tensor(engine.sequence_logprobs(sequences))[:, 1:]
        return float((got - expected[to]).abs().max())

    def stream(weights: dict[str, torch.Tensor], fail_at: int | None = None) -> Iterator:
        for i, (name, tensor) in enumerate(weights.items()):
            if i == fail_at:
                raise ConnectionError("a peer of the round is gone")
            yield name, tensor

    out = {"tensors": len(original), "start": diff("original")}
    # Failing before the first tensor changes nothing; failing part-way (a layer begun: its
    # tensors wait in vLLM until the layer is complete) or before the last tensor does not stop
    # the complete reload after it. Each complete reload changes the weights (moved, back to
    # the original, moved again): a reload that did not happen shows.
    for case, weights, fail_at in [
        ("first", moved, 0),
        ("within", original, 3),
        ("last", moved, len(original) - 1),
    ]:
        try:
            engine.update_weights(stream(weights, fail_at))
            out[f"{case}_raised"] = False
        except Exception:  # noqa: BLE001 - whatever vLLM's worker makes of it
            out[f"{case}_raised"] = True
        if fail_at == 0:
            out[f"{case}_unchanged"] = diff("original")
        engine.update_weights(stream(weights))
        out[case] = diff("original" if weights is original else "moved")
    print("JSON" + json.dumps(out), flush=True)


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    main()
