"""`swengine eval`: long-context evaluation of a run or a model.

* :mod:`.loading` — RUN_DIR | MODEL [+ adapter] → base model with the run's RoPE scaling, patched
  with our kernels (RoPE, fused attention/MLP/norms), adapter weights loaded, in inference mode.
* :mod:`.forward` — final hidden states and the LM head (no full logits anywhere).
* :mod:`.perplexity` — the evaluation token stream and sliding-window perplexity.
* :mod:`.passkey` — passkey-retrieval prompts (PI/YaRN format) and exact greedy scoring.
* :mod:`.runner` — lengths × metrics → one JSON-ready dict (specs/eval.schema.json).
* :mod:`.report` — the stdout table and the atomic JSON writer.
* :mod:`.cli` — the Typer command (imports only typer and the standard library at import time).
"""
