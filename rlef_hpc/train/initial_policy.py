"""The run's initial policy, `run_dir/init/`: a Hugging Face directory with its tokenizer,
which the engines start from and the KL penalty refers to.

- model.init=scratch: a byte-level BPE tokenizer trained on the texts the run will see and a
  tiny Llama, then the supervised warm start (the CPU demo);
- model.init=hf: the HF directory's policy, warm-started if asked, else copied as it is.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch.distributed as dist

from rlef_hpc.checkpoint.hf_dir import build_from_hf, copy_hf_dir, read_model_config, save_model
from rlef_hpc.data.problem import Problem
from rlef_hpc.episodes.runner import EpisodeConfig
from rlef_hpc.episodes.templates import initial_prompt
from rlef_hpc.models.gpt import build_gpt
from rlef_hpc.models.tokenizer import build_tokenizer
from rlef_hpc.sandbox import Executor
from rlef_hpc.train.config import TrainConfig
from rlef_hpc.train.warmstart import demonstrations, repair_demonstrations, warm_start

logger = logging.getLogger(__name__)


def tokenizer_corpus(problems: list[Problem], episodes: EpisodeConfig) -> list[str]:
    """What the demo's tokenizer is trained on: the prompts, answers and feedback it will see."""
    texts = []
    for p in problems:
        texts.append(initial_prompt(episodes.templates, p, episodes.language))
        texts += [f"```python\n{s.source}```" for s in p.solutions]
        texts += [f"{t.input} {t.output}" for t in p.public_tests]
    templates = [v for v in dataclasses.asdict(episodes.templates).values() if isinstance(v, str)]
    return texts * 4 + templates * 20


def build_initial_policy(
    cfg: TrainConfig, problems: list[Problem], valid: list[Problem], out: Path
) -> None:
    """Writes `out` (collective: every rank calls it; parallel state initialised, seeded):
    warm-started on `problems`; `valid`'s reference solutions choose where the warm start
    ends (warmstart.select_every)."""
    spec, w, e = cfg.model, cfg.warmstart, cfg.episodes
    if spec.init == "hf" and not w.steps:  # the initial policy is the HF model as it is
        if dist.get_rank() == 0:
            copy_hf_dir(Path(spec.hf_dir), out)
        dist.barrier()
        return
    if spec.init == "scratch":
        tokenizer = build_tokenizer(tokenizer_corpus(problems, e), spec.tokenizer_vocab)
        model_cfg = spec.scratch_config(len(tokenizer) + len(tokenizer) % 2)
        policy = build_gpt(model_cfg, cfg.precision)
    else:
        from transformers import AutoTokenizer  # heavy: only for HF policies

        hf_dir = Path(spec.hf_dir)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        model_cfg = read_model_config(hf_dir)
        [policy] = build_from_hf(hf_dir, model_cfg, cfg.precision, ("policy",))
    if w.steps:
        examples = demonstrations(problems, tokenizer, e.templates, e.language, w.near_misses)
        if w.repairs:
            with Executor(workers=cfg.rollout.sandbox_workers) as executor:
                repairs = repair_demonstrations(
                    problems, tokenizer, e.templates, e.language, executor
                )
            examples += repairs * w.repairs
        heldout = None
        if w.select_every and valid:
            heldout = demonstrations(valid, tokenizer, e.templates, e.language)
        rank0 = dist.get_rank() == 0
        result = warm_start(
            policy,
            examples,
            w.steps,
            w.batch_size,
            w.lr,
            cfg.run.seed,
            rank0,
            w.warmup_steps,
            heldout,
            w.select_every,
        )
        if rank0:
            line = f"warm start: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}"
            if result.kept is not None:
                step, loss = result.kept
                line += f"; kept step {step} (valid loss {loss:.3f})"
            print(line, flush=True)
            logger.info("warm start: valid loss by step %s", result.heldout)
    source = Path(spec.hf_dir) if spec.init == "hf" else None  # its config and generation ids
    save_model(policy, model_cfg, cfg.precision.dtype, tokenizer, out, source)
