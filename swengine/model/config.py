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
    if key is not None:
        return AutoConfig.for_model(**PRESETS[key])
    if _is_hub_id(model):
        return load_model_config(str(hub_config(model)))
    raise UserError(f"unknown model {model!r}: not a local directory or config.json, a hub id (org/name), or a "
                    f"preset (known: {', '.join(PRESETS)})")


def _is_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def hub_config(repo_id: str) -> Path:
    """config.json of a hub model, fetched alone (no weights) through huggingface_hub and its cache;
    offline it must already be in the cache (HF_HOME), else a one-line error saying so."""
    import logging

    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json", local_files_only=True))  # the cache first
    except Exception:  # noqa: BLE001  (not cached: ask the hub)
        pass
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry lines would break the one-line error
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as exc:  # noqa: BLE001  (offline, not found, gated, network: one line each)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot get config.json of {repo_id} from the Hugging Face hub ({type(exc).__name__}: "
                        f"{first[:160]}); offline it must be in the hub cache (HF_HOME), or pass a local model "
                        "directory, a config.json or a preset") from None
    finally:
        hub_log.setLevel(level)


def check_family(model_type: str) -> None:
    family(model_type)  # raises the one-line error naming the supported families
