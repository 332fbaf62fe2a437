"""What `swengine eval` evaluates, loaded for inference.

The positional argument is either a Hugging Face model directory (``config.json``; e.g. a merged
model), optionally with ``--adapter DIR``, or a `swengine train` output directory (its
``adapter/``; a checkpoint directory or a bare adapter directory works too). For a run (also one
given as ``--adapter``) the base model is loaded with the RoPE scaling the run trained with, found
(first hit wins) in: ``--rope-scaling``; the adapter's ``adapter_config.json`` (``rope_scaling`` /
``rope_parameters``); the run's config (``config.yaml`` next to the adapter or in the run
directory, else the newest checkpoint's, else the last ``run_start`` event of ``metrics.jsonl``):
``context.rope_scaling``.
The model is then patched like the training model (our RoPE kernel, fused attention, MLP and
RMSNorms), the adapter's weights are copied in, and it is put in eval mode.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from swengine.errors import UserError

ROPE_KEYS = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim", "rotary_pct", "rotary_emb_base",
             "partial_rotary_factor")


@dataclass
class Target:
    base: str  # loadable base model path (or hub id)
    adapter: Path | None = None
    run_dir: Path | None = None
    run_config: dict | None = None  # the run's TrainConfig as a dict, when one was found
    rope_scaling: dict | None = None  # applied over the base config (None: the base config's own)
    rope_source: str = "model config"


@dataclass
class Loaded:
    model: object
    tokenizer: object
    device: object
    dtype: object
    max_positions: int
    rope: dict
    kept: list[str] = field(default_factory=list)  # what stayed on the transformers path


def parse_rope_scaling(text: str | None) -> dict | None:
    """--rope-scaling as a dict with a known rope type, or a one-line error."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--rope-scaling is not valid JSON ({exc.msg}); e.g. --rope-scaling "
                        "'{\"rope_type\": \"yarn\", \"factor\": 4}'") from None
    if not isinstance(value, dict):
        raise UserError("--rope-scaling must be a JSON object, e.g. '{\"rope_type\": \"yarn\", \"factor\": 4}'")
    check_rope_type(value, "--rope-scaling")
    return value


def check_rope_type(params: dict, where: str) -> None:
    from swengine.model.load import rope_types

    kind = params.get("rope_type", params.get("type", "linear"))
    known = rope_types()
    if kind not in known:
        raise UserError(f"{where}: unknown rope type {kind!r}; choose one of: {', '.join(known)}")


def _yaml(path: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def read_run_config(adapter: Path, run_dir: Path | None) -> dict | None:
    """The run's config as a dict: next to the adapter (a checkpoint), in the run directory, the
    newest checkpoint's, or the last run_start event's; None when the run left none."""
    places = [adapter / "config.yaml"]
    if run_dir is not None:
        from swengine.train.checkpoint import all_step_dirs

        places += [run_dir / "config.yaml", *(p / "config.yaml" for p in reversed(all_step_dirs(run_dir)))]
    for place in places:
        if place.is_file() and (data := _yaml(place)) is not None:
            return data
    metrics = run_dir / "metrics.jsonl" if run_dir is not None else None
    if metrics is not None and metrics.is_file():
        from swengine.telemetry.logger import read_events

        try:
            starts = read_events(metrics, "run_start", on_torn=lambda _m: None)
        except UserError:
            return None
        for event in reversed(starts):
            if isinstance(event.get("config"), dict):
                return event["config"]
    return None


def _run_rope(adapter_cfg: dict, run_config: dict | None) -> tuple[dict | None, str]:
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(adapter_cfg.get(key), dict) and adapter_cfg[key]:
            return dict(adapter_cfg[key]), f"adapter_config.json {key}"
    rope = ((run_config or {}).get("context") or {}).get("rope_scaling")
    if isinstance(rope, dict) and rope:
        return dict(rope), "run config context.rope_scaling"
    return None, "model config"


def _base_of(adapter: Path, adapter_cfg: dict) -> str:
    from swengine.model import load as model_load

    base = adapter_cfg.get("base_model_name_or_path")
    if not isinstance(base, str):
        raise UserError(f"{adapter}/adapter_config.json names no base_model_name_or_path; pass the base model as "
                        f"MODEL with --adapter {adapter}")
    p = Path(base).expanduser()
    if base and not p.exists() and (base.count("/") != 1 or base.startswith((".", "/", "~"))):
        raise UserError(f"the adapter's base model {base} is not found; pass it as MODEL with --adapter {adapter}")
    return model_load.model_path(base)


def _from_adapter(found: Path, base: str | None) -> Target:
    """An adapter (in a run's adapter/, a checkpoint, or alone) with its run's config and RoPE scaling."""
    from swengine.model.adapter import read_adapter_config

    cfg = read_adapter_config(found)
    run_dir = found.parent if found.name == "adapter" else (
        found.parent.parent if found.parent.name == "checkpoints" else None)
    run_config = read_run_config(found, run_dir)
    rope, source = _run_rope(cfg, run_config)
    return Target(base=base or _base_of(found, cfg), adapter=found, run_dir=run_dir, run_config=run_config,
                  rope_scaling=rope, rope_source=source)


def resolve_target(path: str, adapter: str | None = None, rope_scaling: dict | None = None) -> Target:
    """RUN_DIR | MODEL [+ --adapter] → what to load, with the RoPE scaling to apply."""
    from swengine.train.merge import find_adapter

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path} not found; pass a `swengine train` output directory or a Hugging Face model directory")
    if (p / "config.json").is_file():  # a model directory (a merged model, or a base with --adapter)
        target = Target(base=str(p))
        if adapter is not None:
            a = Path(adapter).expanduser()
            if not a.exists():
                raise UserError(f"--adapter {adapter} not found; pass an adapter directory or a run directory")
            target = _from_adapter(find_adapter(str(a)), str(p))
    else:
        if adapter is not None:
            raise UserError(f"--adapter goes with a MODEL directory; {path} is not one (no config.json): pass the base "
                            "model as MODEL, or drop --adapter to evaluate a run directory with its own adapter")
        if not p.is_dir():
            raise UserError(f"{path} is a file; pass a `swengine train` output directory or a Hugging Face model "
                            "directory")
        try:
            found = find_adapter(str(p))
        except UserError:
            raise UserError(f"{path} is neither a model directory (no config.json) nor a run directory (no "
                            "adapter/adapter_config.json); pass a `swengine train` output directory or a model "
                            "directory") from None
        target = _from_adapter(found, None)
    check_has_rope(target.base)
    if rope_scaling is not None:
        target.rope_scaling, target.rope_source = rope_scaling, "--rope-scaling"
    elif target.rope_scaling is not None:
        check_rope_type(target.rope_scaling, target.rope_source)
    return target


def check_has_rope(base: str) -> None:
    """A model without rotary position embeddings (GPT-2, BERT, ...) is a one-line error."""
    from swengine.model.families import FAMILIES

    cfg = Path(base).expanduser() / "config.json"
    if not cfg.is_file():
        return  # a hub id: the loader says what it can
    try:
        data = json.loads(cfg.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # the config reader gives the precise error
    if isinstance(data, dict) and data.get("model_type") not in FAMILIES and not any(k in data for k in ROPE_KEYS):
        raise UserError(f"{base} (model_type {data.get('model_type')!r}) has no rotary position embedding (RoPE); "
                        "swengine eval measures RoPE models (families: " + ", ".join(FAMILIES) + ")")


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def load(target: Target, device: str = "auto", dtype: str = "auto") -> Loaded:
    """The patched model (inference mode, no grads), its tokenizer and what it was built with."""
    import torch

    from swengine.model import load as model_load
    from swengine.model.adapter import load_adapter_into, read_adapter_config, spec_from_config
    from swengine.model.patch import patch
    from swkernels.nn import RotaryEmbedding

    dev = model_load.resolve_device(device)
    dt = model_load.resolve_dtype(dtype, dev)
    config = model_load.load_config(target.base, 1, target.rope_scaling or {})
    tokenizer = model_load.load_tokenizer(target.base)
    tokenizer.model_max_length = sys.maxsize  # long streams are what we want; no length warnings
    model = model_load.load_model(target.base, config, dt, dev)
    spec = spec_from_config(read_adapter_config(target.adapter)) if target.adapter is not None else None
    with torch.device(dev):
        handle = patch(model, spec)
    if target.adapter is not None:
        load_adapter_into(handle, target.adapter)
    if not any(isinstance(m, RotaryEmbedding) for m in model.modules()):
        raise UserError(f"{target.base} has no rotary embedding module that swengine could patch; swengine eval "
                        "measures RoPE models")
    model.requires_grad_(False)
    model.eval()
    rope = _jsonable(getattr(config, "rope_parameters", None) or {})
    return Loaded(model, tokenizer, dev, dt, int(config.max_position_embeddings), rope, list(handle.kept))
