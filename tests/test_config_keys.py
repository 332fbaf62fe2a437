"""Every config key does something: walking the published schema, each leaf key must be read by
the code on a real (tiny) run, or be refused with a "not available" error. A key that validates
and is then ignored fails here."""

import dataclasses
import typing

import pytest

import swkernels
from swengine import config as config_module
from swengine.config import NOT_YET, TrainConfig, json_schema, load_config
from swengine.errors import UserError


def leaf_keys(schema: dict, prefix: str = "") -> list[str]:
    out = []
    for name, sub in schema["properties"].items():
        if sub.get("type") == "object" and "properties" in sub:
            out += leaf_keys(sub, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _sections(cls=TrainConfig, prefix=""):
    """(dataclass, dotted prefix) for the root and every section."""
    yield cls, prefix
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _sections(hints[f.name], f"{prefix}{f.name}.")


@pytest.fixture
def reads(monkeypatch):
    """Records every config field read outside TrainConfig.to_dict (which copies them all)."""
    seen: set[str] = set()
    copying = [0]
    for cls, prefix in _sections():
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _names=names, _prefix=prefix):
            if name in _names and not copying[0]:
                seen.add(_prefix + name)
            return object.__getattribute__(self, name)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)
    to_dict = TrainConfig.to_dict

    def untracked_to_dict(self):
        copying[0] += 1
        try:
            return to_dict(self)
        finally:
            copying[0] -= 1

    monkeypatch.setattr(TrainConfig, "to_dict", untracked_to_dict)
    return seen


# Tiny runs that between them take every branch a key is read in.
RUNS = [
    ["schedule.max_steps=2", "schedule.warmup_steps=1", "logging.every=1", "logging.eval_every=1",
     "checkpointing.save_every=1", "data.max_seq_len=64", "schedule.micro_batch_size=2"],
    ["schedule.max_steps=1", "schedule.epochs=0.001", "data.packing=false", "fused_loss=false", "lora.impl=peft",
     "checkpointing.gradient_checkpointing=true", "data.max_seq_len=64", "schedule.micro_batch_size=2",
     "data.eval_fraction=0.1", "logging.progress=false", "quantization.load_in_4bit=true"],
    ["context.phases=[32, 64]", "context.phase_steps=1", "schedule.micro_batch_size=2", "logging.eval_every=0",
     "distill.teacher={model}", "distill.kind=jsd"],
]


def tiny_run(tiny_llama, data, out, *overrides):
    from swengine.train.cli import run_train

    with swkernels.force_backend("torch"):
        run_train([f"model.path={tiny_llama}", f"data.train={data}", f"output_dir={out}", *overrides], resume=None,
                  auto=None, gpu=None, dry_run=False)


def test_every_schema_key_is_read_by_a_real_run_or_refused(reads, tiny_llama, tiny_train_data, tmp_path, capsys):
    keys = set(leaf_keys(json_schema()))
    reads.clear()  # building the schema read the defaults
    for i, overrides in enumerate(RUNS):
        tiny_run(tiny_llama, tiny_train_data, tmp_path / str(i), *(o.format(model=tiny_llama) for o in overrides))
    unread = sorted(keys - reads)
    assert not unread, f"config keys that no code read on a real run (implement them or refuse them): {unread}"


def test_progress_false_keeps_notices_and_drops_per_step_lines(tiny_llama, tiny_train_data, tmp_path, capsys):
    tiny_run(tiny_llama, tiny_train_data, tmp_path, "schedule.max_steps=2", "logging.every=1", "logging.eval_every=1",
             "data.max_seq_len=64", "logging.progress=false")
    err = capsys.readouterr().err
    assert "trainable LoRA parameters" in err  # a notice
    assert "step 1/2" not in err and "eval loss" not in err


@pytest.mark.parametrize("key", sorted(NOT_YET))
def test_reserved_keys_are_refused_with_the_reason(key):
    value = "[1, 2]" if key.endswith("phases") else "{}" if key == "distill" else "true"
    with pytest.raises(UserError, match=key.replace(".", r"\.") + ": .*"):
        load_config(None, [f"{key}={value}"])


def test_reserved_keys_are_not_in_the_schema():
    assert not set(NOT_YET) & set(leaf_keys(json_schema())), "a key cannot be both published and refused"
    assert config_module.json_schema()["additionalProperties"] is False
