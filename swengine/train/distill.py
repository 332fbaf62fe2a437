"""Distillation in the training loop: each micro-batch's loss is
``(1 − alpha)·CE(labels) + alpha·KD(teacher ‖ student)`` through :func:`swkernels.fused_linear_distill`
(neither model's logits are materialised), with the teacher either online (a frozen patched
model, bf16 or NF4: ``distill.teacher``) or offline (``distill.cache``, top-k log-probs from
``swengine distill-cache``). The CE and KD parts are computed on logging steps only (one extra
LM-head pass, no decoder rerun) and reported separately.
"""

from __future__ import annotations

import torch

from swengine.config import TrainConfig


class Distiller:
    def __init__(self, cfg: TrainConfig, teacher, cache, vocab: int, where: str):
        self.cfg, self.teacher, self.cache, self.vocab, self.where = cfg, teacher, cache, vocab, where
        self._parts = False
        self._ce: list[torch.Tensor] = []
        self._kd: list[torch.Tensor] = []

    @classmethod
    def create(cls, cfg: TrainConfig, trainer) -> Distiller:
        """The teacher or the cache for this run, checked against the student's tokenizer and data."""
        from swengine.distill.teacher import check_vocab, lm_head, load_teacher
        from swengine.model import load as model_load

        d = cfg.distill
        if d.cache:
            from swengine.distill.cache import open_cache

            train_path, eval_path = trainer.data_paths
            cache = open_cache(d.cache, trainer.tokenizer, train_path, cfg.data, seed=cfg.seed, eval_path=eval_path,
                               rows=trainer.data.train)
            return cls(cfg, None, cache, cache.vocab_size, f"offline (cache {d.cache}, top-{cache.manifest['top_k']})")
        path = model_load.model_path(d.teacher)
        teacher = load_teacher(path, dtype=trainer.dtype, device=trainer.device,
                               quant="nf4-dq" if d.teacher_4bit else "none", attention=cfg.model.attention,
                               max_seq_len=cfg.data.max_seq_len, rope_scaling=cfg.context.rope_scaling or None)
        vocab = check_vocab(trainer.tokenizer, model_load.load_tokenizer(path),
                            lm_head(trainer.model, "student").weight.shape[0], lm_head(teacher, "teacher").weight.shape[0])
        quant = "NF4" if d.teacher_4bit else str(trainer.dtype).replace("torch.", "")
        return cls(cfg, teacher, None, vocab, f"online (teacher {d.teacher}, {quant})")

    def describe(self) -> str:
        d = self.cfg.distill
        beta = f", beta {d.beta}" if d.kind == "jsd" else ""
        return (f"distillation {self.where}: {d.kind}{beta}, temperature {d.temperature}, alpha {d.alpha} "
                f"(KD weight), vocabulary {self.vocab}")

    def start_step(self, parts: bool) -> None:
        """``parts``: also compute the CE and KD parts of this optimizer step (a logging step)."""
        self._parts, self._ce, self._kd = parts, [], []

    def loss_fn(self, rows: list[int]):
        """The loss of one micro-batch made of these training rows (``forward_backward``'s loss_fn)."""
        from swengine.distill.loss import distill_step_loss

        d = self.cfg.distill

        def loss(model, batch, num_items):
            topk = (self.cache.batch_topk(rows, batch["input_ids"].shape[1], batch["input_ids"].device)
                    if self.cache is not None else None)
            value, ce, kd = distill_step_loss(model, self.teacher, batch, kind=d.kind, temperature=d.temperature,
                                              alpha=d.alpha, beta=d.beta, num_items=num_items, topk=topk,
                                              vocab_size=self.vocab, parts=self._parts)
            if self._parts:
                self._ce.append(ce)
                self._kd.append(kd)
            return value

        return loss

    def step_parts(self) -> tuple[float | None, float | None]:
        """(CE, KD) of the step just taken, each a token mean over the step (None off logging steps)."""
        if not self._ce:
            return None, None
        return float(sum(self._ce)), float(sum(self._kd))
