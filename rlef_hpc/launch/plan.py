"""Preflight memory plan: per-GPU memory of a config's layout, before any job is submitted;
for the disaggregated layout also what a refit costs by each transport (`refit_cost`).

Trainer GPU (the most loaded one: the first pipeline stage, which also holds the embedding):
  policy     weights + fp32 gradient buffer + Adam (fp32 master copy + two moments), the
             optimizer part sharded over data parallelism (megatron's distributed optimizer)
  value      the same again: a network of its own (trunk + scalar head), trained alongside
  reference  the frozen initial policy: weights only
  activations  one micro-batch of the longest episode, for each micro-batch the 1F1B pipeline
             schedule keeps in flight (Korthikanti et al. 2022, fused attention:
             s*b*h*(10 + 24/TP) bytes per layer, 34*s*b*h/TP under the sequence parallelism
             megatron runs with on GPU nodes at TP > 1 (`layer_activation_bytes`); with
             precision.recompute=full, each layer's input plus one layer being recomputed),
             and on the last stage the logits path of the policy's loss (`logits_bytes`)
Rollout GPU: vLLM takes rollout.gpu_memory_utilization of the card for its weights (at
rollout.tensor_parallel) and KV cache; the plan reports how many tokens of KV cache remain.
Colocated, the engine shares the trainer's GPUs, at parallel.tensor: the update and the
generation phase are planned apart (rlef_hpc.launch.phases).

The parameter count and the weight + optimizer bytes per parameter (2 + 4 + 12/DP in bf16)
follow megatron's own theoretical memory report (megatron/training/theoretical_memory_usage.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlef_hpc.launch.config import JobConfig
from rlef_hpc.models.config import ModelConfig
from rlef_hpc.train.config import TrainConfig

GB = 1024**3
# Tokens of prompt and feedback per turn, on top of the answer's rollout.max_tokens: what the
# longest episode adds up to (CodeContests statements and feedback run to ~1k tokens).
PROMPT_TOKENS_PER_TURN = 1024

# Shapes of released models of each family, for planning before the checkpoint is downloaded
# (from their config.json files): the directory name's suffix picks one.
LLAMA_31 = {
    "8B": ModelConfig(128256, 4096, 32, 32, 8, 14336),
    "70B": ModelConfig(128256, 8192, 80, 64, 8, 28672),
    "405B": ModelConfig(128256, 16384, 126, 128, 8, 53248),
}
KNOWN_SHAPES = {
    **{f"Llama-3.1-{size}": shape for size, shape in LLAMA_31.items()},
    "Llama-3.2-1B": ModelConfig(128256, 2048, 16, 32, 8, 8192, tie_embeddings=True),
    "Qwen2.5-0.5B": ModelConfig(
        151936, 896, 24, 14, 2, 4864, tie_embeddings=True, family="qwen2", qkv_bias=True
    ),
    "Qwen2.5-7B": ModelConfig(152064, 3584, 28, 28, 4, 18944, family="qwen2", qkv_bias=True),
    "Qwen3-0.6B": ModelConfig(
        151936,
        1024,
        28,
        16,
        8,
        3072,
        tie_embeddings=True,
        family="qwen3",
        qk_norm=True,
        kv_channels=128,
    ),
    "Qwen3-8B": ModelConfig(151936, 4096, 36, 32, 8, 12288, family="qwen3", qk_norm=True),
}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Plan:
    gpu_gb: float
    trainer: dict[str, float]  # term -> bytes on the most loaded trainer GPU
    rollout: dict[str, float]  # term -> bytes on a rollout GPU (colocated: the trainer's)
    notes: list[str] = field(default_factory=list)
    kv_tokens: float = 0.0

    @property
    def trainer_peak(self) -> float:
        return sum(self.trainer.values())

    @property
    def fits(self) -> bool:
        return self.trainer_peak <= self.gpu_gb * GB and self.kv_tokens >= 1

    def dominant(self) -> str:
        return max(self.trainer, key=lambda k: self.trainer[k])

    def refusal(self) -> str:
        if self.kv_tokens < 1:
            return (
                "the rollout engine's weights do not fit in rollout.gpu_memory_utilization of "
                "the card: raise rollout.tensor_parallel or rollout.gpu_memory_utilization"
            )
        term = self.dominant()
        knob = {
            "activations": "set precision.recompute=full, lower update.micro_batch_tokens or "
            "rollout.max_tokens, or raise parallel.tensor",
            "vLLM (colocated)": "lower rollout.gpu_memory_utilization, or use "
            "rollout.layout=disaggregated",
        }.get(
            term,
            "raise parallel.tensor or parallel.pipeline (or parallel.data, which "
            "shards the optimizer states)",
        )
        return (
            f"the layout does not fit: {self.trainer_peak / GB:.1f} GB per trainer GPU > "
            f"{self.gpu_gb:.0f} GB; the largest term is {term} "
            f"({self.trainer[term] / GB:.1f} GB): {knob}"
        )

    def table(self) -> str:
        lines = ["| trainer GPU (most loaded) | GB |", "|---|---|"]
        lines += [f"| {k} | {v / GB:.2f} |" for k, v in self.trainer.items()]
        lines.append(f"| **total** | **{self.trainer_peak / GB:.2f}** of {self.gpu_gb:.0f} |")
        lines += ["", "| rollout GPU | GB |", "|---|---|"]
        lines += [f"| {k} | {v / GB:.2f} |" for k, v in self.rollout.items()]
        lines.append(f"KV cache capacity per engine: {self.kv_tokens:,.0f} tokens")
        lines.append("fits" if self.fits else "DOES NOT FIT: " + self.refusal().split(": ", 1)[1])
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def model_shape(cfg: TrainConfig, notes: list[str]) -> ModelConfig:
    shape = cfg.model.known_shape()
    if shape is not None:
        return shape
    hf = Path(cfg.model.hf_dir or "")
    # the longest name that matches: Qwen3-8B before a bare 8B
    for name in sorted(KNOWN_SHAPES, key=len, reverse=True):
        if name.lower() in hf.name.lower():
            notes.append(f"{hf}/config.json not found: {name}'s shape assumed")
            return KNOWN_SHAPES[name]
    for size, shape in LLAMA_31.items():
        if f"-{size}" in hf.name:
            notes.append(f"{hf}/config.json not found: Llama-3.1-{size}'s shape assumed")
            return shape
    raise ValueError(f"model.hf_dir={hf}: no config.json to plan with")


def parameter_counts(mc: ModelConfig) -> tuple[float, float]:
    """(parameters in the transformer block incl. final norm, in one embedding table), of any
    family: q and o are heads x head_dim wide (Qwen3's head_dim is not hidden / heads), Qwen2
    adds q/k/v biases, Qwen3 two per-head norms."""
    h, kv = mc.hidden_size, mc.num_query_groups * mc.head_dim
    q = mc.num_attention_heads * mc.head_dim
    attention = 2 * h * q + 2 * h * kv  # q and o; k and v (grouped)
    attention += (q + 2 * kv if mc.qkv_bias else 0) + (2 * mc.head_dim if mc.qk_norm else 0)
    mlp = 3 * h * mc.ffn_hidden_size  # gate, up, down (SwiGLU)
    layer = attention + mlp + 2 * h  # two RMSNorms
    return mc.num_layers * layer + h, mc.vocab_size * h


def shard_parameters(mc: ModelConfig, tp: int, pp: int) -> float:
    """Parameters on the most loaded (first) stage's GPU: its layers and the embedding (and
    the output layer too when there is one stage)."""
    block, embedding = parameter_counts(mc)
    shard = block / pp + embedding
    if pp == 1 and not mc.tie_embeddings:
        shard += embedding
    return shard / tp


def layer_activation_bytes(tokens: float, h: int, tp: int, sp: bool, width: int) -> float:
    """What one transformer layer keeps for its backward, for `tokens` (micro-batch rows x
    positions) of hidden size `h`: Korthikanti et al. (2022)'s s*b*h*(10 + 24/TP) bytes of
    16-bit activations with fused attention (no s^2 scores), scaled to `width` bytes. The 10
    are what tensor parallelism alone leaves whole on every rank (the two norms' inputs, the
    QKV and fc1 inputs, the dropout masks); under sequence parallelism they are [s/TP, b, h]
    too, so the whole layer is 34*s*b*h/TP (their eq. 5). In megatron-core 0.16.1: the
    hidden states between layers are scattered over TP (models/common/embeddings/
    language_model_embedding.py LanguageModelEmbedding.forward,
    scatter_to_sequence_parallel_region), and a column-parallel linear saves its input
    before the all-gather and gathers it again in backward (tensor_parallel/layers.py
    LinearWithGradAccumulationAndAsyncCommunication.forward: save_for_backward(input, weight);
    .backward: total_input = all_gather_buffer), so the norms' outputs feeding QKV and fc1
    are kept sharded; Transformer Engine's fused LayerNormLinear does the same under
    sequence_parallel (megatron/core/extensions/transformer_engine.py passes it on)."""
    whole = 10 / tp if sp else 10
    return tokens * h * (whole + 24 / tp) * width / 2


def logits_bytes(positions: float, vocab_shard: float, width: int, device: str) -> float:
    """The peak of the policy loss's logits path for `positions` logits of `vocab_shard`
    entries each in the model's `width` (rl/logprobs.py _ChunkedLogProbs, chunks of
    `default_chunk` tokens on `device`, each upcast to fp32):
    - forward: the output layer's logits, and three fp32 chunk temporaries at once
      (_chunk_stats: the upcast z, z - max, its exp; then z, exp, exp * z);
    - backward, the higher once the logits outgrow a chunk: the logits (saved for it), their
      gradient (`empty_like(logits)`), a chunk's upcast z and its softmax g, and, while those
      are still bound, the next chunk's upcast (16-bit logits: its `.float()` and its
      `/ temperature` for a moment).
    Megatron's output layer makes a copy of the logits twice, each while one of the above is
    freed or not made yet (GPTModel._postprocess: logits.transpose(0, 1).contiguous() for
    rows > 1; its backward: utils.py prepare_input_tensors_for_wgrad_compute,
    grad_output.contiguous()): two whole copies at most. Measured against a real update's
    allocations in tests/test_plan.py."""
    import torch

    from rlef_hpc.rl.logprobs import default_chunk

    chunk = default_chunk(torch.device(device), int(vocab_shard))
    first, following = min(positions, chunk), min(chunk, max(0.0, positions - chunk))
    logits, fp32 = positions * vocab_shard * width, vocab_shard * 4
    upcasts = 1 if width == 4 else 2
    forward = logits + 3 * first * fp32
    backward = 2 * logits + (2 * first + upcasts * following) * fp32
    return max(forward, backward)


def plan(cfg: JobConfig) -> Plan:
    notes: list[str] = []
    mc = model_shape(cfg, notes)
    p, r, s = cfg.parallel, cfg.rollout, cfg.slurm
    gpu_gb = s.gpu_memory_gb
    width = _DTYPE_BYTES[cfg.precision.dtype]
    master = 0 if width == 4 else 4  # fp32 master weights only for 16-bit parameters
    per_param = width + 4 + (master + 8) / p.data  # weights, fp32 grads, sharded Adam
    n = shard_parameters(mc, p.tensor, p.pipeline)
    seq = cfg.episodes.max_turns * (r.max_tokens + PROMPT_TOKENS_PER_TURN)
    u, h = cfg.update, mc.hidden_size
    # Rows of the longest episode's length per micro-batch: a token budget, which the longest
    # episode exceeds alone (every term below is linear in seq * b, the micro-batch's tokens).
    b = max(u.micro_batch_tokens, seq) / seq
    in_flight = p.pipeline  # 1F1B: the first stage holds one micro-batch per stage
    layers = mc.num_layers / p.pipeline * in_flight
    # On GPU nodes (Transformer Engine) megatron runs with sequence parallelism at TP > 1
    # (models/gpt.transformer_config), which shards what Korthikanti et al. keep whole too.
    sp = s.gpus_per_node > 0 and p.tensor > 1
    tokens = seq * b
    per_layer = layer_activation_bytes(tokens, h, p.tensor, sp, width)
    sharded = p.tensor if sp else 1  # a layer's input is [s/TP, b, h] under SP
    if cfg.precision.recompute == "full":  # each layer's input, and one layer recomputed
        activations = tokens * h * width / sharded * layers + per_layer
    else:
        activations = per_layer * layers
    # the embedding's output (scattered over TP under SP) and the token ids
    activations += (tokens * h * width / 2 / sharded + 8 * tokens) * in_flight
    if p.pipeline == 1:  # the last stage's logits path (the first stage's, at PP 1)
        # Under SP the output layer gathers the whole sequence; else (rl/update.py
        # select_logits) logits exist only where they predict a response token.
        answers = cfg.episodes.max_turns * r.max_tokens
        positions = tokens if sp else b * answers
        device = "cuda" if s.gpus_per_node > 0 else "cpu"
        activations += logits_bytes(positions, mc.vocab_size / p.tensor, width, device)
    if sp:
        notes.append(
            f"sequence parallelism at TP {p.tensor} (Transformer Engine on the GPU nodes): "
            "activations sharded over TP"
        )
    trainer = {
        "policy weights + grads + optimizer": n * per_param,
        "value model weights + grads + optimizer": n * per_param,
        "reference policy (frozen)": n * width,
        "activations": activations,
    }
    block, embedding = parameter_counts(mc)
    total = block + embedding * (1 if mc.tie_embeddings else 2)
    engine_tp = p.tensor if r.layout == "colocated" else r.tensor_parallel
    # FP8 rollouts quantise the linear layers' weights to one byte; the embedding and the LM
    # head stay in the model's dtype (vLLM quantises neither).
    linear_width = 1 if r.quantization == "fp8" else width
    engine_weights = (block * linear_width + (total - block) * width) / engine_tp
    budget = r.gpu_memory_utilization * gpu_gb * GB
    kv_per_token = 2 * mc.num_layers * mc.num_query_groups * mc.head_dim * width / engine_tp
    rollout = {"vLLM weights": engine_weights, "vLLM KV cache": max(0.0, budget - engine_weights)}
    notes.append(
        f"{total / 1e9:.2f}B parameters; longest episode {seq} tokens "
        f"({cfg.episodes.max_turns} turns x ({r.max_tokens} answer + {PROMPT_TOKENS_PER_TURN} "
        "prompt/feedback))"
    )
    if r.layout == "colocated":  # the engine on the trainer's GPUs: two phases (phases.py)
        from rlef_hpc.launch.phases import PREFILL_CHUNK, colocated_plan

        kv = mc.num_query_groups * mc.head_dim
        forward = PREFILL_CHUNK * (2 * h + (h + 2 * kv + 3 * mc.ffn_hidden_size) / p.tensor)
        return colocated_plan(
            gpu_gb,
            {k: v for k, v in trainer.items() if k != "activations"},
            activations,
            {"share": budget, "weights": engine_weights, "forward": forward * width},
            kv_per_token,
            kv_needed=max(seq, mc.max_position_embeddings),
            longest=seq,
            reserve_gb=s.gpu_reserve_gb,
            # fp32 master weights and Adam's two moments of both trained models
            offload=2 * n * (master + 8) / p.data,
            notes=notes,
        )
    return Plan(gpu_gb, trainer, rollout, notes, kv_tokens=rollout["vLLM KV cache"] / kv_per_token)


@dataclass
class Refit:
    """What one policy version costs to reach the rollout workers (disaggregated layout), by
    either transport of rollout.weights, against the training step it follows."""

    weight_bytes: float
    bus_s: float
    files_s: float
    step_s: float
    assumptions: list[str]

    def share(self, seconds: float) -> float:
        """The refit's share of an iteration (the trainer waits for it after each step)."""
        return seconds / (self.step_s + seconds)

    def table(self) -> str:
        lines = [
            f"| refit of {self.weight_bytes / 1e9:.1f} GB | seconds | share of an iteration |",
            "|---|---|---|",
            f"| weight bus | {self.bus_s:.1f} | {self.share(self.bus_s):.0%} |",
            f"| files | {self.files_s:.1f} | {self.share(self.files_s):.0%} |",
        ]
        return "\n".join(lines + [f"assuming {a}" for a in self.assumptions])


def refit_cost(cfg: JobConfig, mc: ModelConfig) -> Refit:
    """A first-order model of a refit. The bus: every engine process receives the whole model
    (full tensors; vLLM slices its own) over its GPU's network link, the stages one after the
    other, the buckets pipelined (the gathers on the trainer's NVLink overlap them). The files:
    each pipeline stage's writer writes its share at one node's filesystem rate, then every
    worker reads the whole model (its engine processes share the node's page cache) at one
    node's rate, all of them together at most the filesystem's. The step: 20 model FLOPs per
    parameter and token (forward and backward of policy and value, 6 each; forwards of the
    reference and of the old policy, 2 each; with precision.recompute=full a second forward of
    policy and value, 4 more; else 16) over an average episode of half the longest."""
    p, r, s = cfg.parallel, cfg.rollout, cfg.slurm
    block, embedding = parameter_counts(mc)
    params = block + embedding * (1 if mc.tie_embeddings else 2)
    weight_bytes = params * _DTYPE_BYTES[cfg.precision.dtype]
    bus_s = weight_bytes / (s.network_gbs * 1e9)
    node, total = s.filesystem_node_gbs * 1e9, s.filesystem_total_gbs * 1e9
    write_s = max(weight_bytes / p.pipeline / node, weight_bytes / total)
    read_s = max(weight_bytes / node, r.workers * weight_bytes / total)
    seq = cfg.episodes.max_turns * (r.max_tokens + PROMPT_TOKENS_PER_TURN)
    tokens = r.rollouts_per_iteration * seq / 2
    flops = (20 if cfg.precision.recompute == "full" else 16) * params * tokens
    step_s = flops / (p.world_size * s.gpu_tflops * 1e12 * s.mfu)
    return Refit(
        weight_bytes,
        bus_s,
        write_s + read_s,
        step_s,
        [
            f"{s.network_gbs:g} GB/s per GPU link (slurm.network_gbs), a filesystem of "
            f"{s.filesystem_node_gbs:g} GB/s per node and {s.filesystem_total_gbs:g} GB/s in "
            f"all (slurm.filesystem_node_gbs, slurm.filesystem_total_gbs), {r.workers} workers",
            f"a training step of {step_s:.1f} s: {flops:.2g} FLOPs ({tokens / 1e6:.1f}M tokens) "
            f"on {p.world_size} GPUs at {s.mfu:.0%} (slurm.mfu) of {s.gpu_tflops:g} TFLOP/s "
            "(slurm.gpu_tflops)",
        ],
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    from rlef_hpc.config import ConfigError, load

    ap = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ap.add_argument("--json", action="store_true", help="the terms as JSON (bytes)")
    args = ap.parse_args(argv)
    try:
        cfg = load(JobConfig, args.config, args.overrides)
        result = plan(cfg)
    except (ConfigError, ValueError) as e:
        ap.exit(2, f"plan: error: {e}\n")
    if args.json:
        print(
            json.dumps({"trainer": result.trainer, "rollout": result.rollout, "fits": result.fits})
        )
    else:
        p, r = cfg.parallel, cfg.rollout
        engine_tp = p.tensor if r.layout == "colocated" else r.tensor_parallel
        print(
            f"{args.config}: TP {p.tensor} x PP {p.pipeline} x DP {p.data} training, "
            f"rollout {r.layout} at TP {engine_tp}, "
            f"{cfg.slurm.gpu_memory_gb:.0f} GB GPUs\n"
        )
        print(result.table())
        if cfg.rollout.layout == "disaggregated":
            print()
            print(refit_cost(cfg, model_shape(cfg, [])).table())
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
