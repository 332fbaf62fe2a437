"""`swengine eval` end to end: resolve and load the model, read the data, then for each length the
sliding-window perplexity and the passkey accuracy by depth, as one dict that
specs/eval.schema.json describes. Progress and notices go to ``log`` (stderr from the CLI)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from swengine.errors import UserError

SCHEMA_VERSION = 1
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def check_windows(lengths: Sequence[int], window: int | None, stride: int | None) -> list[tuple[int, int]]:
    """(window, stride) at each length, or a one-line error: the window is --window (at most the
    length; default the length), the stride --stride (default half the window), 1 ≤ stride ≤ window."""
    if not lengths:
        raise UserError("--lengths is empty; pass positive integers, e.g. --lengths 2048,4096,8192")
    for name, value in (("--window", window), ("--stride", stride)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be a positive number of tokens (got {value})")
    out = []
    for length in lengths:
        w = min(window or length, length)
        s = stride or max(1, w // 2)
        if s > w:
            raise UserError(f"--stride {s} exceeds the window of {w} tokens at length {length}; pass a stride of at "
                            "most the window (tokens between windows would never be scored)")
        out.append((w, s))
    return out


def run_data_settings(run_config: dict | None) -> tuple[str, bool]:
    """The run's data.text_field and data.train_on_prompt (defaults: "text", False)."""
    d = (run_config or {}).get("data") or {}
    text_field = d.get("text_field") if isinstance(d.get("text_field"), str) else "text"
    return text_field, d.get("train_on_prompt") is True


def resolve_data(data: str | None, run_config: dict | None, log: Callable[[str], None]) -> tuple[str, str]:
    """(data file, text field): --data, else the run's data.eval, else the demo's eval data."""
    from swengine.model.load import DEMO_EVAL

    d = (run_config or {}).get("data") or {}
    text_field = run_data_settings(run_config)[0]
    if data is not None:
        if not Path(data).expanduser().is_file():
            raise UserError(f"--data {data} not found; pass a .jsonl/.json/.parquet/.txt file")
        return str(Path(data).expanduser()), text_field
    run_eval_data = d.get("eval")
    if isinstance(run_eval_data, str) and run_eval_data and Path(run_eval_data).expanduser().is_file():
        log(f"data: the run's data.eval {run_eval_data}")
        return run_eval_data, text_field
    log(f"data: no --data, using the demo's eval data {DEMO_EVAL} (pass --data FILE with long documents for a "
        "meaningful long-context perplexity)")
    return str(DEMO_EVAL), "text"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _every(n: int) -> int:
    return max(1, n // 10)


def _passkey(loaded, length: int, depths: Sequence[float], trials: int, seed: int,
             log: Callable[[str], None]) -> dict | None:
    """Passkey accuracy at one length, by depth; None if a prompt does not fit."""
    from swengine.eval import passkey

    t0 = time.perf_counter()
    by_depth = []
    for depth in depths:
        r = passkey.evaluate_depth(loaded.model, loaded.tokenizer, length, depth, trials, seed, loaded.device)
        if r is None:
            return None
        by_depth.append({"depth": depth, "trials": r.trials, "correct": r.correct, "accuracy": r.accuracy,
                         "samples": r.samples})
        log(f"length {length}: passkey at depth {depth:g}: {r.correct}/{r.trials}")
    total = sum(d["trials"] for d in by_depth)
    return {"accuracy": sum(d["correct"] for d in by_depth) / total, "depths": by_depth,
            "seconds": round(time.perf_counter() - t0, 3)}


def run_eval(path: str, lengths: Sequence[int], *, adapter: str | None = None, data: str | None = None,
             window: int | None = None, stride: int | None = None, max_tokens: int | None = None,
             depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 5, seed: int = 0, device: str = "auto",
             dtype: str = "auto", rope_scaling: dict | None = None, all_tokens: bool | None = None,
             log: Callable[[str], None] = lambda _m: None) -> dict:
    """``all_tokens``: score prompts too (None: the run's data.train_on_prompt, else False)."""
    from swengine.eval import passkey
    from swengine.eval.loading import load, resolve_target
    from swengine.eval.perplexity import fill_to, sliding_window_nll, token_stream

    start = time.perf_counter()
    plans = check_windows(lengths, window, stride)
    if trials < 0:
        raise UserError(f"--passkey-trials must be >= 0 (got {trials}); 0 skips the passkey test")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2 (got {max_tokens})")
    target = resolve_target(path, adapter, rope_scaling)
    data_path, text_field = resolve_data(data, target.run_config, log)
    log(f"loading {target.base}" + (f" + adapter {target.adapter}" if target.adapter else "")
        + (f" with rope scaling {target.rope_scaling} ({target.rope_source})" if target.rope_scaling else ""))
    loaded = load(target, device, dtype)
    if all_tokens is None:
        all_tokens = run_data_settings(target.run_config)[1]
    stream = token_stream(data_path, loaded.tokenizer, text_field, max_tokens, all_tokens)
    log(f"data: {stream.documents} records ({stream.format}) → {len(stream.ids):,} tokens, {stream.scored:,} of "
        "them scored" + ("" if stream.scored == len(stream.ids) - 1 else
                         " (completions only, as in training; --all-tokens scores prompts too)"))
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        log(f"warning: {message}")

    mean_record = len(stream.ids) / stream.documents
    spanning = [length for length in lengths if mean_record < length / 2]
    if spanning and stream.documents > 1:
        warn(f"the data's records average {mean_record:,.0f} tokens, so windows at length "
             f"{', '.join(map(str, spanning))} span many unrelated records (a model trained on packed, isolated "
             "documents never saw that); for long-context perplexity pass --data with documents of at least "
             "the length")
    shortest = passkey.min_length(loaded.tokenizer)
    results = []
    for length, (w, s) in zip(lengths, plans, strict=True):
        beyond = length > loaded.max_positions
        if beyond:
            warn(f"length {length} exceeds the model's max_position_embeddings={loaded.max_positions} (rope "
                 f"{loaded.rope.get('rope_type', 'default')}): perplexity is still measured, but pass "
                 "--rope-scaling (or evaluate a context-extended run) to extend the model")
        ids, used = fill_to(stream.ids, length)
        targets, _ = fill_to(stream.targets, length)
        if used > 1:
            warn(f"length {length}: the data has only {len(stream.ids):,} tokens, so it was repeated ({used:.2f}×) "
                 "to fill the length; repeated text lowers perplexity (pass --data with more text)")

        def progress(i: int, n: int, length=length) -> None:
            if i == n or i % _every(n) == 0:
                log(f"length {length}: perplexity window {i}/{n}")

        ppl = sliding_window_nll(loaded.model, ids, w, s, loaded.device, progress, targets)
        row = {"length": length, "beyond_max_positions": beyond,
               "perplexity": {"ppl": ppl.ppl, "nll": _finite(ppl.nll), "nll_sum": _finite(ppl.nll_sum), "tokens": ppl.tokens,
                              "window": w, "stride": s, "windows": ppl.windows, "stream_tokens": len(ids),
                              "data_repeats": used, "seconds": round(ppl.seconds, 3)},
               "passkey": None, "passkey_skipped": None}
        if ppl.ppl is None:
            warn(f"length {length}: the mean NLL is {ppl.nll} (not finite, or too large for a perplexity)")
        log(f"length {length}: ppl {ppl.ppl if ppl.ppl is not None else float('inf'):.4g} over {ppl.tokens:,} tokens")
        if trials and depths:
            if length < shortest:
                row["passkey_skipped"] = f"a passkey prompt needs at least {shortest} tokens with this tokenizer"
            else:
                row["passkey"] = _passkey(loaded, length, depths, trials, seed, log)
                if row["passkey"] is None:
                    row["passkey_skipped"] = "a passkey prompt with its pass key does not fit in this length"
            if row["passkey_skipped"]:
                warn(f"length {length}: no passkey test ({row['passkey_skipped']})")
        results.append(row)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"path": target.base, "adapter": str(target.adapter) if target.adapter else None,
                  "run_dir": str(target.run_dir) if target.run_dir else None, "rope": loaded.rope,
                  "rope_source": target.rope_source, "max_position_embeddings": loaded.max_positions,
                  "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
                  "kept_on_transformers": loaded.kept},
        "data": {"path": stream.path, "format": stream.format, "records": stream.documents, "tokens": len(stream.ids),
                 "scored_tokens": stream.scored, "all_tokens": all_tokens},
        "settings": {"lengths": list(lengths), "window": window, "stride": stride, "max_tokens": max_tokens,
                     "passkey_depths": list(depths), "passkey_trials": trials, "seed": seed},
        "results": results,
        "warnings": warnings,
        "seconds": round(time.perf_counter() - start, 3),
    }
