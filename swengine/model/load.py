"""Load a causal LM and its tokenizer for training: local directory or hub id, bf16/fp16/fp32 or
NF4 (QLoRA, via bitsandbytes), our attention entry, and optional RoPE context extension."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from swengine.errors import UserError
from swengine.model.attention import implementation_for
from swengine.model.families import FAMILIES

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_MODEL = ASSETS / "demo_model"
DEMO_TRAIN = ASSETS / "demo_data" / "reverse_train.jsonl"
DEMO_EVAL = ASSETS / "demo_data" / "reverse_eval.jsonl"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is available; use device=auto or device=cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that have it, fp16 (with loss scaling) on those that don't (T4), fp32 on CPU."""
    if name != "auto":
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bf16; use model.dtype=fp16 (or auto)")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_path(path: str) -> str:
    """The model argument as a loadable path: "" is the embedded demo model."""
    if not path:
        return str(DEMO_MODEL)
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"{path} has no config.json; point model.path at a Hugging Face model directory")
        return str(p)
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        return path  # a hub id: from_pretrained will fetch it (or say it cannot)
    raise UserError(f"model path {path} not found; set model.path to a local model directory or a hub id")


def _check_local_config(path: str) -> None:
    """A local config.json must be a UTF-8 JSON object naming a supported ``model_type``; say so in
    one line before transformers raises its own multi-line errors."""
    from swengine.model.config import read_config_json

    cfg = Path(path).expanduser() / "config.json"
    if cfg.is_file():  # else a hub id: from_pretrained fetches it (or says it cannot)
        read_config_json(cfg)


def _check_has_rope(path: str) -> None:
    """Context extension scales RoPE: a model without it (e.g. GPT-2's learned positions) gets
    that said, rather than only "unsupported architecture"."""
    import json

    cfg = Path(path).expanduser() / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
        config = AutoConfig.for_model(**data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return  # the regular checks say what is wrong with it
    if not getattr(config, "rope_parameters", None):
        raise UserError(f"{path} ({data.get('model_type')}) has no rotary position embeddings: RoPE context "
                        "extension does not apply; remove context.rope_scaling / context.phases")


def _check_rope_computes(config, params: dict) -> None:
    """transformers' own init function must accept the parameters: a missing key (llama3's
    low_freq_factor, longrope's long_factor, ...) is one line naming it, not a KeyError traceback."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
    if init is None:
        return
    try:
        init(config, "cpu")
    except KeyError as exc:
        raise UserError(f"context.rope_scaling: rope_type {params['rope_type']!r} needs {exc.args[0]!r} (got "
                        f"{sorted(k for k in params if k != 'rope_theta')}); add it to context.rope_scaling") from None
    except (TypeError, ValueError, AssertionError) as exc:
        raise UserError(f"context.rope_scaling {params}: {str(exc).splitlines()[0]}") from None


def rope_types() -> list[str]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ["default", *ROPE_INIT_FUNCTIONS]


def _rope_params(rope_scaling: dict) -> dict:
    """context.rope_scaling checked: a known rope_type and a finite factor > 0."""
    params = dict(rope_scaling)
    params.setdefault("rope_type", params.pop("type", None) or "linear")
    known = rope_types()
    if params["rope_type"] not in known:
        raise UserError(f"context.rope_scaling: unknown rope_type {params['rope_type']!r}; choose one of: "
                        f"{', '.join(known)}")
    factor = params.get("factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise UserError(f"context.rope_scaling: factor must be a finite number > 0 (got {factor!r})")
    return params


def load_config(path: str, max_seq_len: int, rope_scaling: dict, extending: bool = False):
    """The model's config for training at ``max_seq_len`` with ``rope_scaling`` applied (the
    extended config :func:`save_extended_config` writes next to the adapter). ``extending``: a
    context-extension run (phases), which needs a RoPE model."""
    if rope_scaling or extending:
        _check_has_rope(path)
    _check_local_config(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the config of {path}: {str(exc).splitlines()[0]}") from None
    if config.model_type not in FAMILIES:
        raise UserError(f"unsupported architecture {config.model_type!r} in {path}; supported families: "
                        f"{', '.join(FAMILIES)}")
    limit = config.max_position_embeddings
    if rope_scaling:
        params = _rope_params(rope_scaling)
        params.setdefault("rope_theta", getattr(config, "rope_parameters", {}).get("rope_theta", 10000.0))
        if params["rope_type"] in ("yarn", "llama3", "longrope"):
            params.setdefault("original_max_position_embeddings", limit)
        config.rope_parameters = params
        factor = float(params.get("factor", 1.0))
        if params["rope_type"] != "dynamic":  # dynamic NTK scales past max_position_embeddings by itself:
            config.max_position_embeddings = max(limit, int(math.ceil(limit * factor)), max_seq_len)  # keep it
        _check_rope_computes(config, params)
    elif max_seq_len > limit:
        raise UserError(f"data.max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={limit}; "
                        "shorten it or extend the context with context.rope_scaling='{\"rope_type\": \"yarn\", "
                        f"\"factor\": {math.ceil(max_seq_len / limit)}}}'")
    config.use_cache = False
    return config


EXTENDED_CONFIG = "config.json"  # in an adapter directory: the base config the adapter was trained with


def save_extended_config(config, directory) -> None:
    """Write the training model's config (extended rope parameters and max positions) into an
    adapter directory: ``AutoConfig.from_pretrained(adapter_dir)`` then loads the base as trained."""
    extended = config.__class__.from_dict(config.to_dict())
    extended.use_cache = True
    extended.save_pretrained(str(directory))


def extended_config(adapter_dir):
    """The config saved by :func:`save_extended_config`, or None for an adapter trained at the
    model's own context."""
    if not (Path(adapter_dir) / EXTENDED_CONFIG).is_file():
        return None
    return AutoConfig.from_pretrained(str(adapter_dir))


def load_tokenizer(path: str):
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer of {path}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def from_pretrained_checked(path: str, **kwargs):
    """AutoModelForCausalLM.from_pretrained with unreadable weights (missing, truncated, corrupt
    safetensors) as one line naming the directory."""
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, SafetensorError, EOFError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load model weights from {path}: {first} (is a weights file truncated or "
                        "corrupt? re-download or re-save the model)") from None


def load_model(path: str, config, dtype: torch.dtype, device: torch.device, attention: str = "sdpa",
               load_in_4bit: bool = False, double_quant: bool = True, targets: tuple[str, ...] = ("all-linear",)):
    from swengine.model.patch import resolve_targets
    from swengine.model.quant import quantize_nf4_

    attn = implementation_for(config, "eager" if attention == "eager" else "sdpa")
    if attention == "flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise UserError("model.attention=flash needs flash-attn: pip install 'swengine[flash]' (CUDA only)") from None
        attn = "flash_attention_2"
    if load_in_4bit:
        # Stream local safetensors shards straight into NF4 on the device (host RAM: one shard, not the
        # whole bf16 model; pre-quantised bitsandbytes checkpoints load as they are). The transformers
        # path below stays for what streaming cannot read: hub ids (from_pretrained downloads them),
        # pickled .bin weights (no tensor-by-tensor access) and checkpoints whose keys do not map one
        # to one onto the model (renamed or missing weights transformers converts or initialises);
        # the streaming loader says so from the shard headers, before reading any weight.
        from swengine.model.stream_load import StreamUnsupported, shard_files, stream_load_nf4

        if shard_files(path):
            try:
                return stream_load_nf4(path, config, dtype, device, attn_implementation=attn, targets=targets,
                                       double_quant=double_quant)
            except StreamUnsupported:
                pass
    model = from_pretrained_checked(path, config=config, dtype=dtype, attn_implementation=attn)
    if load_in_4bit:
        quantize_nf4_(model, resolve_targets(model, targets), double_quant=double_quant, compute_dtype=dtype)
    return model.to(device)
