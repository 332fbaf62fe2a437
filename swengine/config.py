"""The one typed configuration schema: YAML files, ``key=value`` CLI overrides and
``specs/config.schema.json`` all derive from these dataclasses.

    cfg = load_config("configs/qlora.yaml", ["lora.rank=32", "optim.lr=1e-4"])
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from swengine.errors import UserError


@dataclass
class ModelConfig:
    path: str = ""  # local HF model directory or hub id; "" = the embedded demo model
    dtype: Literal["bf16", "fp16", "fp32", "auto"] = "auto"  # auto: bf16 where the GPU has it, else fp16
    attention: Literal["sdpa", "eager", "flash"] = "sdpa"
    # a layer our kernels cannot take (unknown layout/activation/norm) is an error instead of a
    # warning line and the transformers path for that part
    strict_kernels: bool = False


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False
    impl: Literal["swkernels", "peft"] = "swkernels"


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = False  # QLoRA: NF4 base weights (bitsandbytes)
    double_quant: bool = True


@dataclass
class DataSource:
    """One source of a data.mix: its own path, sampling weight and format settings."""
    path: str = ""  # as data.train: a file, a directory, a save_to_disk folder or a Hub id org/name
    weight: float = 1.0  # share of the training examples drawn from this source (weights are normalised)
    format: Literal["auto", "text", "alpaca", "prompt_completion", "messages", "sharegpt"] = "auto"
    text_field: str = "text"
    subset: str = ""
    split: str = "train"


@dataclass
class DataConfig:
    # a .jsonl/.json/.parquet/.txt file, a directory of them, a datasets.save_to_disk folder, a
    # Hub-layout folder or a Hub dataset id org/name; "" = the embedded demo dataset
    train: str = ""
    eval: str = ""  # "" = split eval_fraction off the training data
    subset: str = ""  # a Hub dataset's configuration (name); "" = its default
    split: str = "train"  # the split of a Hub dataset or of a save_to_disk DatasetDict (data.train and data.eval)
    # several training sources sampled by weight (instead of data.train), reproducibly by seed
    mix: list[DataSource] = field(default_factory=list)
    format: Literal["auto", "text", "alpaca", "prompt_completion", "messages", "sharegpt"] = "auto"
    text_field: str = "text"
    max_seq_len: int = 512
    packing: bool = True
    # greedy: documents in order, a new row when the next one does not fit; best_fit: best-fit
    # decreasing (fewer rows and pad tokens; the padding ratio is in the run-start line)
    packing_strategy: Literal["greedy", "best_fit"] = "greedy"
    train_on_prompt: bool = False  # False: loss only on completions / assistant turns
    chat_template: str = ""  # "" = the tokenizer's; a bundled name (chatml, llama3) or a .jinja file
    eval_fraction: float = 0.05
    shuffle: bool = True
    # a record longer than max_seq_len tokens: "truncate" it (the count is reported at run start),
    # "drop" it (counted too), or stop with an "error" naming the first one
    truncate: Literal["truncate", "drop", "error"] = "truncate"
    # records that do not fit their format (missing or mistyped fields) left out, counted and reported;
    # one more than this is an error naming the first (0: every malformed record is an error)
    max_bad_rows: int = 0
    # tokenised data is cached here (keyed by data, tokenizer and settings); "" = $SWENGINE_CACHE/tokenized
    # or ~/.cache/swengine/tokenized
    cache_dir: str = ""
    num_proc: int = 1  # processes tokenising on a cache miss


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class ScheduleConfig:
    max_steps: int = 100
    epochs: float = 0.0  # > 0 overrides max_steps
    micro_batch_size: int = 4
    grad_accumulation: int = 1
    warmup_steps: int = 10
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1


@dataclass
class CheckpointConfig:
    gradient_checkpointing: bool = False
    save_every: int = 50  # optimizer steps; 0 = only at the end
    keep_last: int = 2
    keep_best: bool = True


@dataclass
class LoggingConfig:
    every: int = 5
    eval_every: int = 25
    tensorboard: bool = False
    progress: bool = True


Action = Literal["warn", "lower_lr", "skip", "rollback", "stop"]


@dataclass
class SafetyConfig:
    """The circuit breaker (swengine/safety/rules.py): rules checked every optimizer step, each
    with an action. Perplexity regression between context phases uses context.max_ppl_regression."""
    enabled: bool = True
    loss_spike_z: float = 6.0  # robust z-score of a step's loss over the last loss_window steps
    loss_window: int = 50
    grad_norm_spike: float = 10.0  # × the median pre-clipping gradient norm
    eval_regression: float = 0.2  # eval loss this fraction above the best so far
    throughput_drop: float = 0.3  # tokens/s below this fraction of the running median
    vram_margin: float = 0.03  # peak memory within this fraction of the card
    warmup_steps: int = 20  # steps before the spike, gradient and throughput rules may fire
    on_nonfinite: Action = "rollback"
    on_loss_spike: Action = "rollback"
    on_grad_spike: Action = "warn"  # gradients are clipped (optim.max_grad_norm): a spike is bounded already
    on_eval_regression: Action = "warn"
    on_ppl_regression: Action = "warn"
    on_throughput: Action = "warn"
    on_vram: Action = "warn"
    max_rollbacks: int = 3  # a further rollback stops the run
    rollback_lr_factor: float = 0.5  # the LR after a rollback (and for lower_lr)
    on_alert: str = ""  # a shell command run for every trip, the event as JSON on stdin (--on-alert)


@dataclass
class ContextConfig:
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # e.g. {"rope_type": "yarn", "factor": 4.0}
    # training lengths, increasing, e.g. [4096, 8192, 16384]; the last is the target (data.max_seq_len
    # follows it); [] = one phase at data.max_seq_len
    phases: list[int] = field(default_factory=list)
    phase_steps: list[int] = field(default_factory=list)  # optimizer steps per phase (one value: each); [] = schedule.max_steps
    phase_tokens: list[int] = field(default_factory=list)  # or a token budget per phase (one value: each)
    # a phase whose perplexity at the previous phase's length is this much worse (0.1 = 10%) is flagged
    max_ppl_regression: float = 0.1


@dataclass
class DistillConfig:
    teacher: str = ""  # a teacher model directory / hub id (same tokenizer); "" = no online teacher
    teacher_4bit: bool = False  # load the teacher in NF4 (double quant)
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5  # loss = (1 − alpha)·CE(labels) + alpha·KD(teacher ‖ student)
    beta: float = 0.5  # JSD's mixture weight (0 = forward KL, 1 = reverse KL)
    cache: str = ""  # a `swengine distill-cache` directory: distil offline, no teacher in memory


@dataclass
class DistributedConfig:
    """Runs under torchrun (``swengine train --nproc N``); one process reads but does not use it."""
    timeout_s: int = 600  # a rank that answers no collective for this long ends the job (a dead one: at once)
    # ddp: every rank holds the whole model, adapter gradients summed over the ranks; fsdp: the base
    # model's decoder sharded over the ranks (FSDP2 fully_shard), for bases that do not fit one card
    strategy: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    seed: int = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"
    fused_loss: bool = True  # chunked linear + cross-entropy (never materialises full logits)
    auto: bool = False  # ask the planner for rank / batch / accumulation / checkpointing
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys users may know from the docs of similar tools or earlier drafts that do nothing here (yet):
# setting one is an error that says so, never a silently ignored value.
NOT_YET = {
    "safety.max_loss_spike": "is now safety.loss_spike_z (a robust z-score over safety.loss_window steps)",
    "safety.max_grad_norm_spike": "is now safety.grad_norm_spike (× the median gradient norm)",
    "safety.on_trip": "each rule has its own action: safety.on_nonfinite, on_loss_spike, on_grad_spike, "
                      "on_eval_regression, on_ppl_regression, on_throughput, on_vram",
    "model.trust_remote_code": "swengine runs only architectures transformers implements natively (see "
                               "`swengine plan --help` for presets); it never runs a model's remote code",
}

MAX_SEED = 2**32 - 1  # numpy's limit (torch and random take it too)

# ---------------------------------------------------------------- building from dicts

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check/convert ``value`` to the annotated type ``tp``; strings from the CLI are parsed."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UserError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{key} must be true or false (got {value!r})")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.lstrip("-").isdigit()):
            raise UserError(f"{key} must be an integer (got {value!r})")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{key} must be a number (got {value!r})") from None
        if math.isnan(number):
            raise UserError(f"{key} must be a number (got {value!r})")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{key} must be a string (got {value!r})")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            if value.startswith("["):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{key}={value!r} is not a valid JSON list ({exc.msg}); write a,b or "
                                    "'[\"a\", \"b\"]'") from None
            else:
                value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list (got {value!r})")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise UserError(f"{key} must be a JSON object, e.g. '{{\"rope_type\": \"linear\", \"factor\": 2}}'") from None
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping (got {value!r})")
        return dict(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    for key in unknown:
        if f"{prefix}{key}" in NOT_YET:
            raise UserError(f"{prefix}{key}: {NOT_YET[prefix + key]}")
    if unknown:
        raise UserError(f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set_path(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise UserError(f"cannot set {dotted}: {p} is not a section")
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["lora.rank=32", "data.packing=false"]`` → nested dict (values typed later by the schema)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value (e.g. lora.rank=32)")
        key, value = item.split("=", 1)
        if not key.strip():
            raise UserError(f"override {item!r} has no key")
        _set_path(out, key.strip(), value)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: TrainConfig) -> TrainConfig:
    """Cross-field checks with messages that say how to fix the value."""
    if cfg.lora.rank <= 0:
        raise UserError(f"lora.rank must be > 0 (got {cfg.lora.rank}); typical values are 8-64")
    if cfg.lora.alpha <= 0:
        raise UserError(f"lora.alpha must be > 0 (got {cfg.lora.alpha})")
    if not 0 <= cfg.lora.dropout < 1:
        raise UserError(f"lora.dropout must be in [0, 1) (got {cfg.lora.dropout})")
    if cfg.data.max_seq_len < 8:
        raise UserError(f"data.max_seq_len must be >= 8 (got {cfg.data.max_seq_len})")
    if cfg.data.max_bad_rows < 0:
        raise UserError(f"data.max_bad_rows must be >= 0 (got {cfg.data.max_bad_rows})")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise UserError(f"data.eval_fraction must be in [0, 1) (got {cfg.data.eval_fraction})")
    if not math.isfinite(cfg.optim.lr) or cfg.optim.lr <= 0:
        raise UserError(f"optim.lr must be a finite number > 0 (got {cfg.optim.lr}); typical values are 1e-5 to 5e-4")
    for name in ("weight_decay", "eps", "max_grad_norm"):
        value = getattr(cfg.optim, name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"optim.{name} must be a finite number >= 0 (got {value})")
    if not math.isfinite(cfg.lora.alpha):
        raise UserError(f"lora.alpha must be finite (got {cfg.lora.alpha})")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise UserError(f"seed must be an integer from 0 to {MAX_SEED} (got {cfg.seed})")
    if len(cfg.optim.betas) != 2:
        raise UserError(f"optim.betas needs two values (got {cfg.optim.betas})")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise UserError(f"optim.betas must be in [0, 1) (got {cfg.optim.betas})")
    s = cfg.schedule
    if s.max_steps < 1 and s.epochs <= 0:
        raise UserError("schedule.max_steps must be >= 1 (or set schedule.epochs)")
    if s.micro_batch_size < 1 or s.grad_accumulation < 1:
        raise UserError("schedule.micro_batch_size and schedule.grad_accumulation must be >= 1")
    if s.warmup_steps < 0:
        raise UserError(f"schedule.warmup_steps must be >= 0 (got {s.warmup_steps})")
    if cfg.checkpointing.keep_last < 1:
        raise UserError(f"checkpointing.keep_last must be >= 1 (got {cfg.checkpointing.keep_last})")
    if cfg.logging.every < 1:
        raise UserError(f"logging.every must be >= 1 (got {cfg.logging.every})")
    _validate_context(cfg)
    _validate_distill(cfg)
    from swengine.safety.rules import SafetyRules

    safety_rules(cfg, SafetyRules)  # one-line errors naming the safety.* key
    return cfg


def safety_rules(cfg: TrainConfig, cls):
    """The breaker's rules from safety.* (and context.max_ppl_regression for phases)."""
    return cls.from_config({**dataclasses.asdict(cfg.safety), "ppl_regression": cfg.context.max_ppl_regression})


def _validate_distill(cfg: TrainConfig) -> None:
    d = cfg.distill
    if not (d.teacher or d.cache):
        return
    if d.teacher and d.cache:
        raise UserError("give distill.teacher (online) or distill.cache (offline), not both")
    if not math.isfinite(d.temperature) or d.temperature <= 0:
        raise UserError(f"distill.temperature must be > 0 (got {d.temperature}); 1.0 is the usual start")
    if not 0.0 <= d.alpha <= 1.0:
        raise UserError(f"distill.alpha must be in [0, 1] (got {d.alpha}): the weight of KD against the hard-label CE")
    if not 0.0 <= d.beta <= 1.0:
        raise UserError(f"distill.beta must be in [0, 1] (got {d.beta})")
    if not cfg.fused_loss:
        raise UserError("distillation always uses the fused linear loss; remove fused_loss=false")
    if d.cache and cfg.context.phases:
        raise UserError("a distill.cache holds the rows of one training length; context.phases re-pack the data per "
                        "phase: distil online (distill.teacher) or train one length")

def _validate_context(cfg: TrainConfig) -> None:
    c = cfg.context
    if c.phases:
        if any(length < 8 for length in c.phases):
            raise UserError(f"context.phases must be lengths >= 8 tokens (got {c.phases})")
        if any(b <= a for a, b in zip(c.phases, c.phases[1:], strict=False)):
            raise UserError(f"context.phases must increase (got {c.phases}); e.g. [4096, 8192, 16384]")
        cfg.data.max_seq_len = c.phases[-1]  # the target: the model's positions are sized for it
    if c.phase_steps and c.phase_tokens:
        raise UserError("give context.phase_steps or context.phase_tokens, not both")
    for key in ("phase_steps", "phase_tokens"):
        values = getattr(c, key)
        if any(v < 1 for v in values):
            raise UserError(f"context.{key} must be >= 1 (got {values})")
        if values and c.phases and len(values) not in (1, len(c.phases)):
            raise UserError(f"context.{key} has {len(values)} values for {len(c.phases)} context.phases; give one per "
                            "phase or a single value for all")
    if not math.isfinite(c.max_ppl_regression) or c.max_ppl_regression < 0:
        raise UserError(f"context.max_ppl_regression must be a number >= 0 (got {c.max_ppl_regression}); e.g. 0.1 "
                        "flags a phase whose perplexity at the previous length is 10% worse")


def _dotted(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "rope_scaling":
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def explicit_values(path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The dotted keys the user wrote (YAML file and overrides) with their values as written (CLI
    values are strings): the planner never replaces these."""
    return _dotted(_read_data(path, overrides))


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults ← YAML file ← ``key=value`` overrides, validated."""
    return validate(_build(TrainConfig, _read_data(path, overrides)))


def _read_data(path: str | None, overrides: list[str] | None) -> dict:
    data: dict = {}
    if path:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path} not found")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path} is not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} must contain a mapping of config sections")
    return _merge(data, parse_overrides(overrides or []))


# ---------------------------------------------------------------- JSON schema

def _schema_for(tp) -> dict:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        defaults = tp()
        props = {}
        for f in fields(tp):
            sub = _schema_for(hints[f.name])
            if not dataclasses.is_dataclass(hints[f.name]):
                sub["default"] = getattr(defaults, f.name)
            props[f.name] = sub
        return {"type": "object", "additionalProperties": False, "properties": props}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if origin is list:
        return {"type": "array", "items": _schema_for(typing.get_args(tp)[0])}
    if origin is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_for(a) for a in typing.get_args(tp)]}
    raise TypeError(tp)


def json_schema() -> dict:
    schema = _schema_for(TrainConfig)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://swengine.dev/specs/config.schema.json",
            "title": "swengine training config",
            "description": "Generated from swengine/config.py (python -m swengine.config > specs/config.schema.json).",
            **schema}


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
