"""Chunked log-probs equal the naive fp32 computation, values and gradients, in one process
and with the vocabulary split over two gloo ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from rlef_hpc.rl.logprobs import default_chunk, naive_token_logprobs, token_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("chunk", "temperature"), [(1, 1.0), (7, 0.7), (1000, 1.3)])
def test_chunked_equals_naive(dtype, chunk, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 13, 97, generator=gen)).to(dtype).requires_grad_()
    targets = torch.randint(0, 97, (3, 13), generator=gen)
    weights = torch.randn(3, 13, generator=gen)
    logp, entropy = token_logprobs(logits, targets, temperature, chunk=chunk)
    (logp * weights).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    ref_logp, ref_entropy = naive_token_logprobs(logits, targets, temperature)
    (ref_logp * weights).sum().backward()
    # fp32: the two paths round differently (log-sum-exp vs log_softmax), ~1e-5 on logits ~10.
    tol = {"atol": 5e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(logp, ref_logp, **tol)
    torch.testing.assert_close(entropy, ref_entropy, **tol)
    torch.testing.assert_close(grad.float(), logits.grad.float(), **tol)
    assert logp.dtype == torch.float32 and grad.dtype == dtype


def test_logits_are_not_modified():
    logits = torch.randn(4, 11)
    before = logits.clone()
    token_logprobs(logits, torch.zeros(4, dtype=torch.long), chunk=2)
    assert torch.equal(logits, before)


def test_no_host_sync_in_the_chunk_loops(monkeypatch):
    """On a GPU, nonzero, item, tolist and truth values wait for the device: none per chunk,
    forward or backward (patched rather than intercepted by a TorchFunctionMode, which
    autograd does not apply inside a Function's backward)."""

    def host_sync(*args, **kwargs):
        raise AssertionError("waits for the device")

    for owner, name in [(torch, "nonzero"), (torch.Tensor, "nonzero")] + [
        (torch.Tensor, n) for n in ("item", "tolist", "__bool__", "__int__", "__float__")
    ]:
        monkeypatch.setattr(owner, name, host_sync)
    logits = torch.randn(10, 17, requires_grad=True)
    logp, _ = token_logprobs(logits, torch.randint(0, 17, (10,)), chunk=3)
    logp.sum().backward()
    monkeypatch.undo()
    assert logits.grad is not None


def test_chunks_are_larger_on_a_gpu():
    llama3 = 128256
    cpu, gpu = (
        default_chunk(torch.device("cpu"), llama3),
        default_chunk(torch.device("cuda"), llama3),
    )
    assert 250 < cpu < 270 and gpu >= 4 * cpu
    assert default_chunk(torch.device("cpu"), llama3 // 8) >= 8 * cpu  # a TP8 shard


VOCAB_PARALLEL = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from rlef_hpc.rl.logprobs import naive_token_logprobs, token_logprobs
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(9, 40, generator=gen) * 2
    targets = torch.randint(0, 40, (9,), generator=gen)
    shard = full[:, rank * 20 : (rank + 1) * 20].clone().requires_grad_()
    group = dist.group.WORLD
    logp, ent = token_logprobs(shard, targets, 0.8, chunk=4, vocab_start=rank * 20, group=group)
    logp.sum().backward()
    ref = full.clone().requires_grad_()
    ref_logp, ref_ent = naive_token_logprobs(ref, targets, 0.8)
    ref_logp.sum().backward()
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    mine = ref.grad[:, rank * 20 : (rank + 1) * 20]
    torch.testing.assert_close(shard.grad, mine, atol=1e-5, rtol=1e-5)
    print("rank", rank, "ok")
    """
)


@pytest.mark.multiprocess
def test_vocab_parallel_over_two_ranks(tmp_path):
    script = tmp_path / "vp.py"
    script.write_text(VOCAB_PARALLEL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        str(script),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout


NEXT_TOKEN = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from megatron.core import parallel_state as ps
    from rlef_hpc.rl.logprobs import naive_token_logprobs, next_token_logprobs
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(2, 1)
    rank = ps.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(3, 7, 40, generator=gen) * 2
    tokens = torch.randint(0, 40, (3, 7), generator=gen)
    shard = full[..., rank * 20 : (rank + 1) * 20].clone().requires_grad_()
    logp, ent = next_token_logprobs(shard, tokens, 0.8)
    logp.sum().backward()
    ref = full.clone().requires_grad_()
    ref_logp, ref_ent = naive_token_logprobs(ref[:, :-1], tokens[:, 1:], 0.8)
    ref_logp.sum().backward()
    assert logp.shape == ent.shape == (3, 7)
    assert not logp[:, 0].any() and not ent[:, 0].any()
    torch.testing.assert_close(logp[:, 1:], ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[:, 1:], ref_ent, atol=1e-5, rtol=1e-5)
    mine = ref.grad[..., rank * 20 : (rank + 1) * 20]
    torch.testing.assert_close(shard.grad, mine, atol=1e-5, rtol=1e-5)
    """
)


@pytest.mark.multiprocess
def test_next_token_logprobs_over_a_tensor_parallel_group(tmp_path):
    """Shifted by one position and over the whole vocabulary, the TP group and each rank's
    offset taken from megatron's parallel state."""
    from tests.helpers import torchrun

    script = tmp_path / "next_token.py"
    script.write_text(NEXT_TOKEN)
    torchrun(script, 2, timeout=300)
