"""What Transformer Engine and CUDA change, checked on the CPU: TE's parameter names through
import, export and refit; the checkpoint's optimizer workaround kept to torch's Adam; FP8
configs as megatron accepts them; the fusions and overlaps each kernel allows; the local
spec's RMSNorm."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import get_args, get_type_hints

import pytest
import torch

from rlef_hpc.checkpoint.hf import checkpoint_key_to_name, hf_to_megatron, megatron_to_hf
from rlef_hpc.models.config import PRESETS, ModelConfig, PrecisionConfig, validate

CFG = ModelConfig(
    vocab_size=32,
    hidden_size=16,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=24,
)

# Written out here, not derived as the code derives them: what Transformer Engine's layer spec
# names the layer norms it fuses into the next linear.
TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def local_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A random full state named as megatron's local spec names it."""
    gen = torch.Generator().manual_seed(0)
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim
    shapes = {
        "embedding.word_embeddings.weight": (v, h),
        "decoder.final_layernorm.weight": (h,),
        "output_layer.weight": (v, h),
    }
    for i in range(cfg.num_layers):
        shapes |= {
            f"decoder.layers.{i}.input_layernorm.weight": (h,),
            f"decoder.layers.{i}.self_attention.linear_qkv.weight": (qkv, h),
            f"decoder.layers.{i}.self_attention.linear_proj.weight": (h, h),
            f"decoder.layers.{i}.pre_mlp_layernorm.weight": (h,),
            f"decoder.layers.{i}.mlp.linear_fc1.weight": (2 * f, h),
            f"decoder.layers.{i}.mlp.linear_fc2.weight": (h, f),
        }
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def te_name(name: str) -> str:
    for local, te in TE_NAMES.items():
        if name.endswith("." + local):
            return name.removesuffix(local) + te
    return name


def module_with(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose parameters are named (and ordered) as `state`'s keys."""
    root = torch.nn.Module()
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(tensor.clone()))
    return root


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(itertools.chain.from_iterable(megatron_to_hf(k, t, CFG) for k, t in state.items()))


@pytest.fixture
def one_rank(monkeypatch):
    """megatron's parallel state of a single process (TP=1, PP=1), without a process group."""
    from megatron.core import parallel_state as ps

    for getter, value in [
        ("get_pipeline_model_parallel_rank", 0),
        ("get_pipeline_model_parallel_world_size", 1),
        ("get_tensor_model_parallel_rank", 0),
        ("get_tensor_model_parallel_world_size", 1),
        ("get_tensor_model_parallel_group", None),
    ]:
        monkeypatch.setattr(ps, getter, lambda value=value, **_: value)


def test_te_names_export_as_the_local_spec_names_do():
    local = local_state(CFG)
    hf = to_hf(local)
    te = {te_name(k): t for k, t in local.items()}
    assert set(te) != set(local)
    exported = to_hf(te)
    assert exported.keys() == hf.keys()
    assert all(torch.equal(exported[k], hf[k]) for k in hf)
    # torch_dist keys: stacked layers, norms under TE's names whichever spec saved them
    for suffix in TE_NAMES.values():
        local_suffix = next(k for k, v in TE_NAMES.items() if v == suffix)
        assert checkpoint_key_to_name(f"decoder.layers.{suffix}", 3) == (
            f"decoder.layers.3.{local_suffix}"
        )
    extra = "decoder.layers.self_attention.linear_qkv._extra_state"
    assert checkpoint_key_to_name(extra, 0) is None


def test_te_named_models_import_and_refit_as_local_ones(one_rank):
    from rlef_hpc.checkpoint.hf_dir import hf_weights
    from rlef_hpc.checkpoint.layout import gather_full_state, load_full_state

    local = local_state(CFG)
    hf = to_hf(local)
    imported = hf_to_megatron(hf, CFG)
    for strict in (True, False):  # the policy's load, and the value model's (a fresh head)
        model = module_with({te_name(k): torch.zeros_like(t) for k, t in local.items()})
        load_full_state(model, imported, CFG.num_layers, strict=strict)
        for name, param in model.named_parameters():
            original = next(k for k in local if te_name(k) == name)
            assert torch.equal(param, local[original]), name  # norms included, not left at 0
        gathered = gather_full_state(model, CFG.num_layers)
        assert gathered.keys() == local.keys()
        refit = dict(hf_weights(model, CFG))
        assert refit.keys() == hf.keys()
        assert all(torch.equal(refit[k], hf[k]) for k in hf)


class StrictAdam(torch.optim.Optimizer):
    """Stands in for Transformer Engine's FusedAdam: its state_dict and load_state_dict reject
    per-parameter state it does not know (a "step")."""

    KNOWN = {"exp_avg", "exp_avg_sq"}

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    def _check(self, state: dict) -> None:
        for entry in state.values():
            unknown = set(entry) - self.KNOWN
            if unknown:
                raise KeyError(f"unknown optimizer state {sorted(unknown)}")

    def state_dict(self) -> dict:
        self._check(self.state)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._check(state_dict["state"])
        super().load_state_dict(state_dict)


def test_resume_workaround_only_touches_torch_adam():
    from rlef_hpc.checkpoint.training import _init_state

    params = [torch.nn.Parameter(torch.ones(3))]
    fused = StrictAdam(params)
    _init_state(SimpleNamespace(optimizer=fused))  # a megatron optimizer around it
    fused.load_state_dict(fused.state_dict())
    adamw = torch.optim.AdamW(params)
    _init_state(SimpleNamespace(optimizer=adamw))
    assert set(adamw.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_fp8_configs_are_valid_exactly_where_megatron_accepts_them():
    from megatron.core.transformer.transformer_config import TransformerConfig

    hints = get_type_hints(PrecisionConfig)
    formats = [f for f in get_args(get_args(hints["fp8"])[0]) if f is not None]
    recipes = get_args(hints["fp8_recipe"])
    assert formats and recipes
    for fmt, recipe, bf16_ends in itertools.product(formats, recipes, (False, True)):
        try:
            TransformerConfig(
                num_layers=4,
                hidden_size=64,
                num_attention_heads=2,
                bf16=True,
                params_dtype=torch.bfloat16,
                fp8=fmt,
                fp8_recipe=recipe,
                first_last_layers_bf16=bf16_ends,
            )
            megatron = True
        except ValueError:
            megatron = False
        try:
            precision = PrecisionConfig("bfloat16", fmt, recipe, bf16_ends)
            validate(PRESETS["tiny"], _parallel(), precision, (9, 0), transformer_engine=True)
            ours = True
        except ValueError as e:
            assert "precision.fp8_first_last_bf16" in str(e)
            ours = False
        assert ours == megatron, (fmt, recipe, bf16_ends)
    # the defaults with FP8 switched on are a valid config
    validate(
        PRESETS["tiny"],
        _parallel(),
        PrecisionConfig("bfloat16", "e4m3"),
        (9, 0),
        transformer_engine=True,
    )


def _parallel():
    from rlef_hpc.models.config import ParallelConfig

    return ParallelConfig()


def test_fp8_without_transformer_engine_is_refused_by_name():
    with pytest.raises(ValueError, match="precision.fp8 needs Transformer Engine"):
        validate(PRESETS["tiny"], _parallel(), PrecisionConfig("bfloat16", "e4m3"), (9, 0))


def test_batches_pad_to_the_models_sequence_multiple():
    from rlef_hpc.data.trajectory import Trajectory, Turn
    from rlef_hpc.models.gpt import sequence_multiple
    from rlef_hpc.rl.ppo import collate

    turn = Turn(0, 3, 5, [-0.5, -0.25], "", None, False, reward=1.0)
    trajectory = Trajectory("p", "python", [1, 2, 3, 4, 5], [turn], False)
    plain, padded = collate([trajectory]), collate([trajectory], multiple=16)
    assert plain.tokens.shape == (1, 5) and padded.tokens.shape == (1, 16)
    assert torch.equal(padded.tokens[:, :5], plain.tokens) and not padded.response_mask[:, 5:].any()
    assert torch.equal(padded.logp_behaviour[:, :5], plain.logp_behaviour)

    assert sequence_multiple(_config(None, False, 4)) == 1
    assert sequence_multiple(_config("e4m3", False, 4)) == 16
    assert sequence_multiple(_config(None, True, 4)) == 4
    assert sequence_multiple(_config("hybrid", True, 32)) == 256


def _config(fp8: str | None, sp: bool, tp: int, recipe: str = "delayed") -> SimpleNamespace:
    """The fields of megatron's TransformerConfig that decide the sequence multiple."""
    return SimpleNamespace(
        fp8=fp8, fp8_recipe=recipe, sequence_parallel=sp, tensor_model_parallel_size=tp
    )


# Transformer Engine 2.11's conditions on the token rows of an FP8 GEMM, copied from its source
# (v2.11 tag): (where, the recipes it applies to, the rows it is asked of, the divisor).
# "local": the input of a TE linear as the rank holds it (under sequence parallelism a
# column-parallel layer's is the rank's s/tp positions); "gathered": the layer's whole token
# count; "all-gathered": the local input of a layer that all-gathers it (column-parallel under
# sequence parallelism).
ALL_RECIPES = ("delayed", "tensorwise", "blockwise")
TE_FP8_ROWS = [
    # pytorch/utils.py assert_dim_for_fp8_exec: `math.prod(tensor.shape[:-1]) % 8 == 0`, on
    # every FP8 linear's input (module/linear.py, layernorm_linear.py, layernorm_mlp.py forward)
    ("utils.py assert_dim_for_fp8_exec", ALL_RECIPES, "local", 8),
    # common/gemm/cublaslt_gemm.cu CanonicalizeGemmInput: `ret.lda % 16 == 0`, `ret.ldb % 16 ==
    # 0` for FP8 operands (tensor scaling and block scaling), lda = ldb = k in the TN layout
    # Hopper takes; k is the token count in the weight-gradient GEMM
    ("cublaslt_gemm.cu CanonicalizeGemmInput", ALL_RECIPES, "gathered", 16),
    # pytorch/utils.py assert_dim_for_all_gather(inputmat, with_input_all_gather, quantizer) ->
    # tensor/float8_blockwise_tensor.py Float8BlockQuantizer.is_quantizable:
    # `math.prod(inp.shape[:-1]) % self.block_len != 0` -> False, block_len = 128
    ("Float8BlockQuantizer.is_quantizable", ("blockwise",), "all-gathered", 128),
]


def _te_violations(s: int, rows: int, tp: int, sp: bool, recipe: str) -> list[str]:
    """The conditions of TE_FP8_ROWS that a batch of `rows` sequences of `s` positions breaks
    (with sequence parallelism s must also split evenly over the tensor-parallel ranks)."""
    if sp and s % tp:
        return ["s/tp"]
    local = (s // tp if sp else s) * rows
    asked = {"local": local, "gathered": s * rows, "all-gathered": local if sp else None}
    return [
        where
        for where, recipes, which, divisor in TE_FP8_ROWS
        if recipe in recipes and asked[which] is not None and asked[which] % divisor
    ]


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_fp8_batches_pad_to_what_transformer_engine_asserts(recipe):
    """For each FP8 recipe, tensor-parallel size and micro-batch rows, every length padded to
    sequence_multiple meets TE's conditions (9,232 tokens at TP4 used to be padded to 16 only:
    2,308 rows per rank, not a multiple of 8); and the multiple is the least length that meets
    them, so no batch pads further than TE needs."""
    from rlef_hpc.models.gpt import sequence_multiple

    for tp, fp8 in itertools.product((1, 2, 4, 8), ("e4m3", "hybrid")):
        for sp in (False, True) if tp > 1 else (False,):
            multiple = sequence_multiple(_config(fp8, sp, tp, recipe))
            for length, rows in itertools.product((1, 100, 2308, 6144, 9217, 9232), (1, 2, 3)):
                s = -(-length // multiple) * multiple
                broken = _te_violations(s, rows, tp, sp, recipe)
                assert not broken, (recipe, fp8, tp, sp, length, rows, s, broken)
            least = next(s for s in itertools.count(1) if not _te_violations(s, 1, tp, sp, recipe))
            assert multiple == least, (recipe, tp, sp, multiple, least)


@pytest.fixture
def te_rope(monkeypatch):
    """megatron refuses apply_rope_fusion unless Transformer Engine's fused RoPE imported."""
    import megatron.core.models.common.embeddings.rope_utils as rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)


def test_fusions_follow_the_kernels_present(te_rope):
    from rlef_hpc.models.gpt import Kernels, available_kernels, transformer_config

    fusions = (
        "gradient_accumulation_fusion",
        "bias_dropout_fusion",
        "apply_rope_fusion",
        "masked_softmax_fusion",
        "sequence_parallel",
    )

    def on(kernels: Kernels, tp: int = 2) -> set[str]:
        config = transformer_config(PRESETS["tiny"], PrecisionConfig(), tp, 1, kernels)
        return {f for f in fusions if getattr(config, f)}

    assert available_kernels() == Kernels()  # this CPU machine: everything as before
    assert on(Kernels()) == set()
    assert on(Kernels(cuda=True)) == {"bias_dropout_fusion"}
    te = {"bias_dropout_fusion", "apply_rope_fusion", "sequence_parallel"}
    assert on(Kernels(cuda=True, te=True)) == te
    assert on(Kernels(cuda=True, te=True), tp=1) == te - {"sequence_parallel"}
    assert on(Kernels(cuda=True, te=True, apex=True)) == set(fusions)
    assert on(Kernels(cuda=True, apex=True)) == {
        "bias_dropout_fusion",
        "gradient_accumulation_fusion",
        "masked_softmax_fusion",
    }


def test_gradient_and_parameter_communication_overlap_with_te():
    from rlef_hpc.models.gpt import Kernels
    from rlef_hpc.rl.optim import OptimConfig, ddp_config

    gpu = ddp_config(OptimConfig(), Kernels(cuda=True, te=True))
    assert gpu.overlap_grad_reduce and gpu.overlap_param_gather and gpu.use_distributed_optimizer
    replicated = ddp_config(OptimConfig(distributed_optimizer=False), Kernels(cuda=True, te=True))
    assert replicated.overlap_grad_reduce and not replicated.overlap_param_gather
    cpu = ddp_config(OptimConfig(), Kernels())
    assert not cpu.overlap_grad_reduce and not cpu.overlap_param_gather


def test_local_spec_asks_for_rmsnorm(monkeypatch):
    """With apex installed the local spec's norm is apex's FusedLayerNorm unless RMSNorm is
    asked for (and FusedLayerNorm rejects RMSNorm): a stand-in for it shows which one is used."""
    from megatron.core.models import backends
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from rlef_hpc.models.gpt import Kernels, layer_spec

    class ApexFusedLayerNorm(torch.nn.Module):
        pass

    monkeypatch.setattr(backends, "LNImpl", ApexFusedLayerNorm)
    layer = layer_spec(Kernels()).submodules
    assert layer.input_layernorm is WrappedTorchNorm
    assert layer.pre_mlp_layernorm is WrappedTorchNorm


def test_step_finishes_an_overlapped_parameter_gather_unless_a_forward_comes_next():
    from rlef_hpc.rl.optim import Trainable

    def trainable(overlap: bool, syncs: list[bool]) -> Trainable:
        model = SimpleNamespace(
            ddp_config=SimpleNamespace(overlap_param_gather=overlap),
            start_param_sync=lambda force_sync=False: syncs.append(force_sync),
        )
        return Trainable(model, SimpleNamespace(step=lambda: (True, 1.0, 0)), None)

    syncs: list[bool] = []
    assert trainable(True, syncs).step() == (True, 1.0, 0) and syncs == [True]
    trainable(True, syncs).step(gather=False)
    trainable(False, syncs).step()
    assert syncs == [True]
