"""The eval report: a table on stdout (one row per length: perplexity, then passkey accuracy by
depth) and the JSON file (specs/eval.schema.json), written atomically."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from swengine.errors import UserError


def _rope_words(rope: dict) -> str:
    kind = rope.get("rope_type", "default")
    return f"{kind} ×{rope['factor']:g}" if isinstance(rope.get("factor"), (int, float)) else kind


def render(report: dict) -> str:
    m, d = report["model"], report["data"]
    depths = report["settings"]["passkey_depths"] if report["settings"]["passkey_trials"] else []
    head = [f"{m['path']}" + (f" + {m['adapter']}" if m["adapter"] else "")
            + f"  (rope {_rope_words(m['rope'])} from {m['rope_source']}, max positions {m['max_position_embeddings']:,}, "
            f"{m['device']} {m['dtype']})",
            f"data: {d['path']} ({d['records']} records, {d['tokens']:,} tokens)"]
    cols = ["length", "ppl", "nll", "tokens", "window/stride"] + [f"key@{x:g}" for x in depths]
    if depths:
        cols.append("key all")
    rows, notes = [], []
    for r in report["results"]:
        p = r["perplexity"]
        mark = ("*" if p["data_repeats"] > 1 else "") + ("!" if r["beyond_max_positions"] else "")
        ppl = f"{p['ppl']:.3f}" if p["ppl"] is not None else "inf"
        row = [f"{r['length']}{mark}", ppl, f"{p['nll']:.4f}", f"{p['tokens']:,}", f"{p['window']}/{p['stride']}"]
        if depths:
            if r["passkey"] is None:
                row += ["-"] * (len(depths) + 1)
            else:
                row += [f"{x['correct']}/{x['trials']}" for x in r["passkey"]["depths"]]
                row.append(f"{r['passkey']['accuracy']:.0%}")
        rows.append(row)
    if any(p["perplexity"]["data_repeats"] > 1 for p in report["results"]):
        notes.append("* the data was repeated to fill this length (perplexity is optimistic)")
    if any(r["beyond_max_positions"] for r in report["results"]):
        notes.append("! beyond the model's max_position_embeddings")
    if any(r["passkey"] is None and r["passkey_skipped"] for r in report["results"]):
        notes.append("- no passkey test: the length is shorter than a passkey prompt")
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([*head, "", line, *body, *([""] + notes if notes else [])])


def check_out(out: str) -> Path:
    """--out as a path, refused before the evaluation runs when it names a directory or lies under a file."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise UserError(f"--out {out} is a directory; pass a file path, e.g. {path / 'eval.json'}")
    parent = next((q for q in path.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a directory; pick another --out")
    return path


def write_json(report: dict, out: str) -> Path:
    """Write the report to ``out`` through a temporary sibling and a rename: a reader never sees a
    partial file, and a failed write leaves an existing file as it was."""
    path = check_out(out)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(report, indent=2, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write --out {out}: {exc.strerror or exc}") from None
    return path
