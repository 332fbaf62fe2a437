import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from swengine.config import TrainConfig, json_schema, load_config, parse_overrides
from swengine.errors import UserError

ROOT = Path(__file__).parents[1]


def test_committed_schema_is_the_generated_one():
    committed = json.loads((ROOT / "specs" / "config.schema.json").read_text())
    assert committed == json_schema(), "regenerate: python -m swengine.config > specs/config.schema.json"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse_and_validate(path):
    cfg = load_config(str(path))
    jsonschema.validate(cfg.to_dict(), json_schema())
    jsonschema.validate(yaml.safe_load(path.read_text()), json_schema())


def test_demo_config_parses():
    from swengine.train.cli import DEMO_CONFIG

    cfg = load_config(str(DEMO_CONFIG))
    assert cfg.model.path == "" and cfg.data.train == ""


def test_overrides_are_typed_by_the_schema(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora: {rank: 8}\nschedule: {max_steps: 5}\n")
    cfg = load_config(str(f), ["lora.rank=32", "optim.lr=1e-4", "data.packing=false", "lora.targets=q_proj,v_proj",
                               "context.rope_scaling={\"rope_type\": \"linear\", \"factor\": 2}"])
    assert cfg.lora.rank == 32 and cfg.optim.lr == 1e-4 and cfg.data.packing is False
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.schedule.max_steps == 5
    assert cfg.context.rope_scaling == {"rope_type": "linear", "factor": 2}


@pytest.mark.parametrize("override,message", [
    (["lora.rnk=3"], "unknown config key lora.rnk; valid keys here:"),
    (["nonsense=1"], "unknown config key nonsense"),
    (["lora.rank=0"], "lora.rank must be > 0"),
    (["lora.rank=two"], "lora.rank must be an integer"),
    (["optim.name=sgd"], "choose one of: adamw, adamw8bit, paged_adamw8bit"),
    (["data.packing=maybe"], "must be true or false"),
    (["justakey"], "section.key=value"),
])
def test_bad_values_give_one_clear_error(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_config(None, override)


def test_missing_yaml_file():
    with pytest.raises(UserError, match="not found"):
        load_config("nope.yaml")


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=2"]) == {"a": {"b": {"c": "1"}, "d": "2"}}


def test_defaults_roundtrip_through_yaml():
    d = TrainConfig().to_dict()
    assert load_config(None, []).to_dict() == d
