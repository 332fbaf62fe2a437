#!/usr/bin/env python
"""Build the embedded demo: a tiny Llama-architecture base model pretrained on the procedurally
generated world language (swengine/demo/world.py), its BPE tokenizer with a chat template, and
the demo fine-tuning data. Reproducible from the seed; writes into swengine/assets/.

    python tools/make_demo_model.py [--steps 600] [--out swengine/assets]

About 10 minutes on a 2-core CPU. The outputs are committed, so users never run this.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from swengine.demo import world


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # a word is the same token everywhere
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=world.SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", chat_template=world.CHAT_TEMPLATE,
                                   model_max_length=512)


def corpus_texts(rng: random.Random, n_docs: int, n_chats: int, tokenizer=None) -> list[str]:
    docs = [world.document(rng, rng.randint(3, 8)) for _ in range(n_docs)]
    chats = []
    for _ in range(n_chats):
        convo = []
        for _ in range(rng.randint(1, 3)):
            convo += world.base_task(rng)
        chats.append(convo)
    if tokenizer is None:  # for training the tokenizer: render the template's markers inline
        return docs + [" ".join(m["content"] for m in c) for c in chats]
    return docs + [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]


def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids += [tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="swengine/assets")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-only", action="store_true", help="only regenerate the demo fine-tuning data")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.data_only:
        write_demo_data(out)
        return 0
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    tokenizer = build_tokenizer(corpus_texts(random.Random(args.seed + 1), 3000, 3000), vocab_size=768)
    data = pack(tokenizer, corpus_texts(rng, 8000, 24000, tokenizer), seq_len=256)
    print(f"tokenizer: {len(tokenizer)} tokens; corpus: {data.numel():,} tokens in {len(data)} sequences")

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    warmup, batch = 30, 16
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    start = time.time()
    model.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(data), (batch,))
        x = data[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)

    model_dir = out / "demo_model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_demo_data(out)
    return 0


def write_demo_data(out: Path) -> None:
    data_dir = out / "demo_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("reverse_train.jsonl", 1600, 101), ("reverse_eval.jsonl", 100, 202)):
        with open(data_dir / name, "w") as f:
            for row in world.reverse_dataset(n, seed):
                f.write(json.dumps(row) + "\n")
    print(f"wrote {data_dir}")


if __name__ == "__main__":
    raise SystemExit(main())
