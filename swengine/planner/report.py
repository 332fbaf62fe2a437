"""Render a plan as a table (terminal) or JSON (specs/plan.schema.json)."""

from __future__ import annotations

from swengine import SCHEMA_VERSION
from swengine.planner.search import GiB, Plan

LABELS = {
    "base_weights": "base weights",
    "lora_params": "LoRA adapters (fp32)",
    "optimizer_states": "optimizer states",
    "activations": "activations kept for backward",
    "logits_and_loss": "logits and loss buffers",
    "layer_workspace": "layer workspace (recompute, head)",
    "adapter_grads_and_casts": "adapter grads + bf16 casts",
    "other": "other",
    "nf4_dequant_buffer": "NF4 dequantisation buffer",
    "teacher_weights": "teacher weights",
    "teacher_logits_and_forward": "teacher logits and forward",
}


def to_dict(p: Plan) -> dict:
    e = p.estimate
    return {
        "schema_version": SCHEMA_VERSION,
        "model": p.model,
        "gpu": p.gpu,
        "vram_bytes": p.vram_bytes,
        "seq_len": p.seq_len,
        "effective_batch": p.effective_batch,
        "fits": p.fits,
        "setup": e.setup.to_dict() if e else None,
        "grad_accumulation": p.grad_accumulation,
        "breakdown": dict(e.components) if e else {},
        "peak_allocated_bytes": e.peak_allocated if e else None,
        "cuda_context_bytes": e.cuda_context if e else None,
        "allocator_slack_bytes": e.allocator_slack if e else None,
        "total_vram_bytes": e.total_vram if e else None,
        "peak_phase": e.peak_phase if e else None,
        "tokens_per_second": p.tokens_per_second,
        "prefer": p.prefer,
        "speed_source": p.speed_source,
        "alternatives": [{"setup": a.estimate.setup.to_dict(), "grad_accumulation": a.grad_accumulation,
                          "total_vram_bytes": a.estimate.total_vram, "tokens_per_second": a.tokens_per_second,
                          "why_not": a.why_not} for a in p.alternatives],
        "reasons": list(p.reasons),
        "notes": list(e.notes) if e else [],
        "minimum_vram_bytes": p.minimum_vram_bytes,
        "max_context": p.max_context,
        "max_position_embeddings": getattr(p, "max_position_embeddings", None),
        "warnings": list(getattr(p, "warnings", [])),
    }


def render(p: Plan) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    out = StringIO()
    console = Console(file=out, width=100, force_terminal=False, color_system=None)
    e = p.estimate
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    console.print(f"{p.model} on {p.gpu} ({p.vram_bytes / GiB:.1f} GiB), seq_len {p.seq_len}: {verdict}")
    for warning in getattr(p, "warnings", []):
        console.print(f"warning: {warning}", soft_wrap=True)
    table = Table(title="peak memory of one training step", show_lines=False)
    table.add_column("component")
    table.add_column("GiB", justify="right")
    for key, value in e.components.items():
        table.add_row(LABELS.get(key, key), f"{value / GiB:.2f}")
    table.add_row("[bold]peak allocated[/bold]", f"{e.peak_allocated / GiB:.2f}")
    table.add_row("allocator slack", f"{e.allocator_slack / GiB:.2f}")
    table.add_row("CUDA context", f"{e.cuda_context / GiB:.2f}")
    table.add_row("[bold]total VRAM[/bold]", f"{e.total_vram / GiB:.2f}")
    console.print(table)
    s = e.setup
    label = "recommended" if p.fits else "smallest possible"
    console.print(f"{label}: LoRA rank {s.lora_rank}, base {'bf16' if s.quant == 'none' else s.quant}, "
                  f"micro-batch {s.micro_batch} × grad-accumulation {p.grad_accumulation} "
                  f"(effective batch {s.micro_batch * p.grad_accumulation}), checkpointing "
                  f"{'on' if s.checkpointing else 'off'}, optimizer {s.optimizer}, loss {s.loss}, LoRA {s.lora_impl}")
    if p.tokens_per_second:
        console.print(f"throughput estimate: ~{p.tokens_per_second:,.0f} tokens/s ({p.speed_source})", soft_wrap=True)
    if p.max_context is not None:
        console.print(f"max context at micro-batch {s.micro_batch} with this setup: {p.max_context:,} tokens")
    for reason in p.reasons:
        console.print(f"  - {reason}")
    for note in e.notes:
        console.print(f"  note: {note}")
    if p.alternatives:
        alt = Table(title=f"alternatives (--prefer {p.prefer})", show_lines=False)
        for column in ("setup", "accum", "GiB", "tokens/s", "why not chosen"):
            alt.add_column(column, justify="right" if column in ("accum", "GiB", "tokens/s") else "left")
        for a in p.alternatives:
            s = a.estimate.setup
            alt.add_row(f"{'bf16' if s.quant == 'none' else s.quant}, mb {s.micro_batch}, ckpt "
                        f"{'on' if s.checkpointing else 'off'}, {s.optimizer}", str(a.grad_accumulation),
                        f"{a.estimate.total_vram / GiB:.2f}",
                        f"{a.tokens_per_second:,.0f}" if a.tokens_per_second else "-", a.why_not)
        console.print(alt)
    return out.getvalue().rstrip()
