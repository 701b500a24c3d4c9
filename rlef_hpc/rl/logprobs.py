"""Token log-probs (and entropy) from logits without materialising [tokens, vocab] in fp32.

With Llama 3's 128,256-entry vocabulary, one 8k-token sequence of fp32 log-softmax is 4 GB, and
autograd would keep it for the backward pass. Here the logits (any dtype, possibly a vocab
shard under tensor parallelism) are processed `chunk` tokens at a time in fp32 (by default as
many as fit a memory budget per temporary, larger on a GPU: `default_chunk`); the forward
keeps only the per-token log-normaliser, and the backward recomputes each chunk's softmax:

    d logp_i / d z_ij = (onehot_ij - softmax_ij) / T

Temperature divides the logits before the softmax, as vLLM does when sampling.
Under tensor parallelism (`group` given) each rank holds logits for its slice of the vocab,
[vocab_start, vocab_start + shard); max, sum-exp and the target logit are all-reduced (two
all-reduces a chunk), so the result is the log-prob over the whole vocabulary. Nothing in the
per-chunk loops waits on the device (no nonzero, item or tolist). Unlike megatron's
vocab_parallel_cross_entropy, the logits are never modified in place.
`next_token_logprobs` is the form every trainer uses: a model's vocab-parallel output over whole
sequences, the group and offset taken from megatron's parallel state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

# Bytes of one fp32 temporary [chunk, vocab shard] (a chunk holds about three at once). On the
# CPU, about 256 tokens at Llama 3's vocabulary; on a GPU four times that: every chunk costs two
# tensor-parallel all-reduces and a chain of small kernels, so fewer, larger chunks are faster.
CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 512 * 2**20}


def default_chunk(device: torch.device, shard: int) -> int:
    """Tokens per chunk for logits of `shard` vocabulary entries each on `device`."""
    budget = CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // (4 * shard))


def _all_reduce(t: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunk_stats(z: torch.Tensor, targets: torch.Tensor, vocab_start: int, group: Any):
    """For fp32 logits z [n, shard]: (log-normaliser [n], target logit [n], entropy [n]).
    Under tensor parallelism, two all-reduces: the max, then the three sums together."""
    global_max = _all_reduce(z.max(dim=-1).values, dist.ReduceOp.MAX, group)
    e = torch.exp(z - global_max[:, None])  # the chunk's one big temporary besides z
    local = (targets >= vocab_start) & (targets < vocab_start + z.shape[-1])
    index = (targets - vocab_start).clamp(0, z.shape[-1] - 1)
    target = torch.where(local, z.gather(1, index[:, None]).squeeze(1), 0.0)
    # H = lse - sum(p * z), with p = e / sum_exp: that sum needs every shard too.
    sums = torch.stack([e.sum(-1), (e * z).sum(-1), target])
    sum_exp, ez, target = _all_reduce(sums, dist.ReduceOp.SUM, group)
    lse = global_max + torch.log(sum_exp)
    return lse, target, lse - ez / sum_exp


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk, vocab_start, group):
        n = logits.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy = torch.empty(n, dtype=torch.float32, device=logits.device)
        lses = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            z = logits[s : s + chunk].float() / temperature
            lse, target, ent = _chunk_stats(z, targets[s : s + chunk], vocab_start, group)
            logp[s : s + chunk] = target - lse
            lses[s : s + chunk] = lse
            entropy[s : s + chunk] = ent
        ctx.save_for_backward(logits, targets, lses)
        ctx.temperature, ctx.chunk, ctx.vocab_start = temperature, chunk, vocab_start
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        logits, targets, lses = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            z = logits[s : s + ctx.chunk].float() / ctx.temperature
            g = torch.exp(z.sub_(lses[s : s + ctx.chunk, None])).neg_()  # -softmax, in z's place
            t = targets[s : s + ctx.chunk] - ctx.vocab_start
            local = (t >= 0) & (t < z.shape[-1])
            # + onehot where this shard holds the target: a scatter, not a host-synced index
            g.scatter_add_(1, t.clamp(0, z.shape[-1] - 1)[:, None], local[:, None].to(g.dtype))
            g *= grad_logp[s : s + ctx.chunk, None] / ctx.temperature
            grad[s : s + ctx.chunk] = g.to(grad.dtype)
        return grad, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk: int | None = None,
    vocab_start: int = 0,
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy) per row of `logits` [..., vocab_shard]; fp32, shape [...].
    `chunk`: tokens at a time (default: `default_chunk` for the logits' device)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    chunk = chunk or default_chunk(logits.device, logits.shape[-1])
    logp, entropy = _ChunkedLogProbs.apply(
        flat, targets.reshape(-1), float(temperature), int(chunk), int(vocab_start), group
    )
    return logp.reshape(shape), entropy.reshape(shape)


def vocab_parallel_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` of a model's output `logits` [..., vocab shard], this tensor-parallel
    rank's slice of the vocabulary (megatron's parallel state, which must be initialised,
    gives the rank and group): the result is over the whole vocabulary at any tensor
    parallelism."""
    from megatron.core import parallel_state as ps  # heavy: deferred to first use

    return token_logprobs(
        logits,
        targets,
        temperature,
        vocab_start=ps.get_tensor_model_parallel_rank() * logits.shape[-1],
        group=ps.get_tensor_model_parallel_group(),
    )


def next_token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token | the tokens before it), entropy of that prediction) [b, s] from a model's
    vocab-parallel output `logits` [b, s, vocab shard] on `tokens` [b, s]; position 0, which
    nothing predicts, is zero."""
    logp, entropy = vocab_parallel_logprobs(logits[:, :-1], tokens[:, 1:], temperature)
    pad = torch.zeros(logp.shape[0], 1, dtype=logp.dtype, device=logp.device)
    return torch.cat([pad, logp], 1), torch.cat([pad, entropy], 1)


def naive_token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook fp32 path, for comparison: materialises [tokens, vocab] log-softmax."""
    logsm = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logsm.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy
