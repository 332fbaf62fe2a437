"""Resolve a model argument (preset name, hub id of a preset, model directory, config.json) to a config."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from swengine.errors import UserError
from swengine.model.families import FAMILIES, family
from swengine.model.presets import PRESETS, preset_key


def read_config_json(path: Path) -> dict:
    """A config.json as a dict: UTF-8 JSON, an object, naming a supported ``model_type`` — or a
    one-line :class:`UserError` before transformers raises its own multi-line errors."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; is it a Hugging Face config.json?") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object; is it a Hugging Face config.json?")
    model_type = data.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise UserError(f"{path} has no model_type; is it a Hugging Face config.json? "
                        f"(supported families: {', '.join(FAMILIES)})")
    check_family(model_type)
    return data


def load_model_config(model: str) -> PretrainedConfig:
    """A transformers config for a preset name (``llama-3.1-8b``), a local model directory, or a
    ``config.json`` file. Raises :class:`UserError` naming the presets when nothing matches."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{model} is a directory without config.json; point --model at a Hugging Face model directory")
    if path.is_file():
        data = read_config_json(path)
        try:
            return AutoConfig.for_model(**data)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{path}: transformers cannot read this config "
                            f"({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
    key = preset_key(model)
    if key is None:
        raise UserError(f"unknown model {model!r}: not a local directory or config.json, and not a preset "
                        f"(known: {', '.join(PRESETS)})")
    return AutoConfig.for_model(**PRESETS[key])


def check_family(model_type: str) -> None:
    family(model_type)  # raises the one-line error naming the supported families
