"""`swengine train`'s loop vs Hugging Face `Trainer` + PEFT on the same tiny model, data and
hyper-parameters, in the same process: tokens/s of optimizer steps and peak memory.

Both train the embedded demo model (1.2M-parameter Llama) on the demo's packed rows
(micro-batch 8 × 128 tokens), rank-32 LoRA on every projection, AdamW (torch fused), lr 5e-3,
warmup 20 + cosine, grad-norm clip 1.0, no gradient checkpointing, fp32 on a CPU (bf16 autocast on
a GPU). One benchmark call = ``STEPS`` optimizer steps: ours calls the loop's own step
(data → forward/backward → clip → AdamW → scheduler); the baseline calls ``Trainer.train()`` for
``STEPS`` steps, so it also pays Trainer's per-call setup (dataloader, optimizer creation), which
``extra_info['hf_setup_seconds']`` measures separately so the ratio can be read without it.
"""

import time

import pytest
import torch

import swkernels
from bench.harness import BASELINE, ON_CUDA, OURS, run

STEPS = 8
SHAPE = "demo-llama-1.2M B8xS128 r32"
PROVIDERS = {"swengine": OURS, "hf-trainer+peft": BASELINE}


@pytest.fixture(scope="module")
def ours():
    from swengine.config import load_config
    from swengine.train.cli import DEMO_CONFIG
    from swengine.train.trainer import Trainer

    cfg = load_config(str(DEMO_CONFIG), ["device=" + ("cuda" if ON_CUDA else "cpu"), "output_dir=/tmp/swbench-train"])
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.setup()
    return trainer


def _hf_trainer(ours):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    cfg = ours.cfg
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    model = AutoModelForCausalLM.from_pretrained(ours.model_path, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                             target_modules="all-linear"))
    rows = [{"input_ids": torch.tensor(r.input_ids), "labels": torch.tensor(r.labels),
             "position_ids": torch.tensor(r.position_ids)} for r in ours.data.train]  # the same packed rows
    args = TrainingArguments(
        output_dir="/tmp/swbench-hf", max_steps=STEPS, per_device_train_batch_size=cfg.schedule.micro_batch_size,
        learning_rate=cfg.optim.lr, warmup_steps=cfg.schedule.warmup_steps, lr_scheduler_type="cosine",
        max_grad_norm=cfg.optim.max_grad_norm, weight_decay=cfg.optim.weight_decay, optim="adamw_torch_fused",
        bf16=ON_CUDA, use_cpu=not ON_CUDA, save_strategy="no", logging_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=cfg.seed, remove_unused_columns=False)
    return Trainer(model=model, args=args, train_dataset=rows)


def _hf_setup_seconds(trainer) -> float:
    """Trainer.train()'s time before its first step: what one call costs beyond STEPS steps."""
    from transformers import TrainerCallback

    marks = {}

    class Mark(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks.setdefault("first_step", time.perf_counter())

    cb = Mark()
    trainer.add_callback(cb)
    start = time.perf_counter()
    trainer.train()
    trainer.remove_callback(cb)
    return marks["first_step"] - start


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_steps(benchmark, provider, ours):
    tokens = STEPS * ours.cfg.schedule.micro_batch_size * ours.cfg.data.max_seq_len
    if provider == "swengine":
        # as `swengine train` runs on a CPU: the kernels' torch fallbacks (bench/ sets TRITON_INTERPRET)
        backend = None if ON_CUDA else "torch"

        def fn():
            with swkernels.force_backend(backend):
                for _ in range(STEPS):
                    ours._train_step()
    else:
        hf = _hf_trainer(ours)
        benchmark.extra_info["hf_setup_seconds"] = _hf_setup_seconds(hf)
        fn = hf.train
    benchmark.extra_info["tokens_per_call"] = tokens
    run(benchmark, fn, op="train-steps", provider=provider, role=PROVIDERS[provider], shape=SHAPE, smoke=False)
    benchmark.extra_info["tokens_per_second"] = tokens / benchmark.stats.stats.min
