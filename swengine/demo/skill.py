"""Measure a chat skill by exact match of greedy generations (the demo's before/after number)."""

from __future__ import annotations

import torch


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 16, batch_size: int = 32) -> float:
    """Fraction of rows whose greedy answer equals the reference assistant turn (whitespace-trimmed).
    Each row is ``{"messages": [user, assistant]}``."""
    if not rows:
        return 0.0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    tokenizer.padding_side = "left"
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
                   for r in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=True):
            answer = tokenizer.decode(seq, skip_special_tokens=True).strip()
            correct += answer == row["messages"][-1]["content"].strip()
    model.train(was_training)
    return correct / len(rows)
