"""Shared test helpers: per-dtype tolerances and comparisons, tiny model directories, the CLI."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (atol, rtol) for results computed in fp32 and rounded once to the output dtype.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, name: str = "") -> None:
    """Compare with the tolerance of ``dtype`` (default: ``expected.dtype``), widened by ``scale``."""
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale,
                               msg=lambda m: f"{name}: {m}" if name else m)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: str | None = None,
            interpret: bool = False):
    """Run ``swengine ARGS`` in a fresh process (the real entry point), returning CompletedProcess.
    As a CPU user runs it: without TRITON_INTERPRET (the torch fallbacks), unless ``interpret``."""
    import os
    import subprocess
    import sys

    full_env = {k: v for k, v in os.environ.items() if interpret or k != "TRITON_INTERPRET"}
    full_env.update(env or {})
    code = "from swengine.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def collect_each_op():
    """A dispatch mode that runs gc after every op: the Triton interpreter leaves reference
    cycles that keep real tensors alive longer than on a GPU, which would inflate a real peak."""
    import gc

    from torch.utils._python_dispatch import TorchDispatchMode

    class _Collect(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            gc.collect()
            return out

    return _Collect()


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


def config_classes() -> dict:
    """family name → transformers config class (gemma3: the text-only config)."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
            "phi3": Phi3Config, "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig}


def make_model(root: Path, family: str = "llama") -> Path:
    """A tiny random model of ``family`` with the demo tokenizer, saved under ``root``."""
    from transformers import AutoModelForCausalLM

    from swengine.model.load import DEMO_MODEL, load_tokenizer

    tok = load_tokenizer(str(DEMO_MODEL))
    extra = _GEMMA if family.startswith("gemma") else {}
    cfg = config_classes()[family](**SMALL, **extra, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    path = root / f"tiny-{family}"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def pretrain(model, rows, pad_id: int, steps: int = 60, lr: float = 3e-3, micro_batch: int = 4) -> None:
    """Full-parameter Adam steps of plain CE on ``rows``: a random tiny model that has learned
    something (a distillation student, a teacher), in a second on CPU."""
    from swengine.data.batches import BatchStream

    stream, opt = BatchStream(rows, micro_batch, 1, pad_id), torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        b = stream.next()
        model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    """``swengine ARGV`` in-process through the console entry point (exit code and streams as a user
    sees them), on the torch fallbacks: (exit code, stdout, stderr)."""
    import pytest

    import swkernels
    from swengine.cli import main

    with swkernels.force_backend("torch"), pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err
