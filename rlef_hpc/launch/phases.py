"""The colocated layout's memory, phase by phase: the trainer and its engines take turns on
the same GPUs, and each phase must fit on its own.

Generation (the engine awake): the trainer's states stay resident (the policy and value
models' weights, fp32 gradient buffers and Adam states, the reference policy), and the engine
takes rollout.gpu_memory_utilization of the card for its weights (at parallel.tensor), its
forward pass and its KV cache. The engine is started before the trainer's models and vLLM
takes its share at start (vllm/v1/worker/gpu_worker.py determine_available_memory), so the
share is fixed for the run: resident states + reserve + share <= the card.
Update (the engine asleep): vLLM's sleep level 2 releases both of its memory pools, weights
(discarded: the refit overwrites them all) and KV cache (vllm/device_allocator/cumem.py
CuMemAllocator.sleep with no offload tags; gpu_worker.py Worker.sleep); the activations of the
update take their place.
Both phases carry a reserve that neither releases: the CUDA context, NCCL's communicator
buffers (the trainer's and the engine's), vLLM's CUDA graphs (slurm.gpu_reserve_gb, an
assumption to check with nvidia-smi on the first run).

Megatron's optimizer CPU offload (OptimizerConfig.optimizer_cpu_offload: the fp32 master
weights and Adam moments of `optimizer_offload_fraction` of the parameters kept on the host
and stepped there by torch's AdamW, megatron/core/optimizer/__init__.py and
optimizer/cpu_offloading/hybrid_optimizer.py) would take its bytes off the card in both
phases, for a host Adam step per update; the plan says what it would free and that it pays
only where a phase does not fit (it does not for the shipped one-node config).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlef_hpc.launch.plan import GB, Plan

# vLLM's default prefill chunk (SchedulerConfig.max_num_batched_tokens with chunked prefill):
# the largest forward pass it profiles at start and runs later.
PREFILL_CHUNK = 8192
RESERVE = "CUDA context, NCCL buffers, vLLM's CUDA graphs (slurm.gpu_reserve_gb)"
ASLEEP = "vLLM asleep (level 2: weights and KV cache released)"
KV = "vLLM KV cache"


@dataclass
class ColocatedPlan(Plan):
    """`trainer`: the update phase's terms on one GPU; `rollout`: the generation phase's."""

    kv_needed: float = 0.0  # tokens the KV cache must hold: vLLM's max_model_len
    longest: float = 0.0  # tokens of the longest episode
    resident: float = 0.0  # bytes of the trainer's states (both phases)
    offload: float = 0.0  # bytes megatron's optimizer CPU offload would take off the card
    # bytes the engine needs at least: weights, a forward pass, KV cache for kv_needed tokens
    engine_minimum: float = 0.0

    @property
    def generation_peak(self) -> float:
        return sum(self.rollout.values())

    @property
    def fits(self) -> bool:
        return (
            self.trainer_peak <= self.gpu_gb * GB
            and self.generation_peak <= self.gpu_gb * GB
            and self.kv_tokens >= self.kv_needed
        )

    def refusal(self) -> str:
        card = self.gpu_gb * GB
        if self.generation_peak > card:
            room = card - self.resident - self.rollout[RESERVE]
            what = (
                f"lower rollout.gpu_memory_utilization to at most {room / card:.2f}, or raise "
                "parallel.tensor"
                if room >= self.engine_minimum
                else f"the engine needs {self.engine_minimum / GB:.1f} GB beside them, "
                f"{max(room, 0.0) / GB:.1f} GB remain: raise parallel.tensor"
            )
            return (
                f"the generation phase does not fit: {self.generation_peak / GB:.1f} GB per "
                f"GPU > {self.gpu_gb:.0f} GB (the trainer's states, {self.resident / GB:.1f} "
                f"GB, stay resident beside the engine's share): {what} (megatron's optimizer "
                f"CPU offload, not wired here, would free {self.offload / GB:.1f} GB)"
            )
        if self.trainer_peak > card:
            term = self.dominant()
            return (
                f"the update phase does not fit: {self.trainer_peak / GB:.1f} GB per GPU > "
                f"{self.gpu_gb:.0f} GB; the largest term is {term} "
                f"({self.trainer[term] / GB:.1f} GB): "
                + (
                    "set precision.recompute=full, lower update.micro_batch_tokens or "
                    "rollout.max_tokens, or raise parallel.tensor"
                    if term == "activations"
                    else "raise parallel.tensor (or parallel.data, which shards the "
                    "optimizer states)"
                )
            )
        return (
            f"the engine's KV cache holds {self.kv_tokens:,.0f} tokens, fewer than the "
            f"{self.kv_needed:,.0f} vLLM needs for one sequence (max_model_len: the model's "
            "max_position_embeddings, and the longest episode): raise "
            "rollout.gpu_memory_utilization or parallel.tensor"
        )

    def table(self) -> str:
        lines = ["| update phase, one GPU | GB |", "|---|---|"]
        lines += [f"| {k} | {v / GB:.2f} |" for k, v in self.trainer.items()]
        lines.append(f"| **total** | **{self.trainer_peak / GB:.2f}** of {self.gpu_gb:.0f} |")
        lines += ["", "| generation phase, one GPU | GB |", "|---|---|"]
        lines += [f"| {k} | {v / GB:.2f} |" for k, v in self.rollout.items()]
        lines.append(f"| **total** | **{self.generation_peak / GB:.2f}** of {self.gpu_gb:.0f} |")
        lines.append(
            f"KV cache capacity per engine: {self.kv_tokens:,.0f} tokens "
            f"({self.kv_tokens / self.longest:.0f} longest episodes at once; vLLM needs "
            f"{self.kv_needed:,.0f})"
        )
        lines.append("fits" if self.fits else "DOES NOT FIT: " + self.refusal())
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def colocated_plan(
    gpu_gb: float,
    states: dict[str, float],
    activations: float,
    engine: dict[str, float],
    kv_per_token: float,
    kv_needed: float,
    longest: float,
    reserve_gb: float,
    offload: float,
    notes: list[str],
) -> ColocatedPlan:
    """Both phases on one GPU. `states`: the trainer's resident terms (bytes); `engine`:
    "share" (rollout.gpu_memory_utilization of the card), "weights" and "forward" (a prefill
    chunk's activations) in bytes; `kv_per_token`: the engine's KV bytes per token on one
    GPU; `offload`: what megatron's optimizer CPU offload would free."""
    reserve = reserve_gb * GB
    kv = max(0.0, engine["share"] - engine["weights"] - engine["forward"])
    update = {**states, "activations": activations, ASLEEP: 0.0, RESERVE: reserve}
    generation = {
        **{f"{k} (resident)": v for k, v in states.items()},
        RESERVE: reserve,
        "vLLM weights": engine["weights"],
        f"vLLM forward pass ({PREFILL_CHUNK:,}-token prefill chunk)": engine["forward"],
        KV: kv,
    }
    resident = sum(states.values())
    result = ColocatedPlan(
        gpu_gb,
        update,
        generation,
        notes,
        kv_tokens=kv / kv_per_token,
        kv_needed=kv_needed,
        longest=longest,
        resident=resident,
        offload=offload,
        engine_minimum=engine["weights"] + engine["forward"] + kv_needed * kv_per_token,
    )
    notes.append(
        "the trainer releases nothing between phases (its states stay resident); the engine "
        "sleeps at level 2 through the update and refits in place after it"
    )
    if result.fits:
        notes.append(
            f"megatron's optimizer CPU offload would free {offload / GB:.1f} GB per GPU in "
            "both phases: not needed, both fit without it"
        )
    return result
