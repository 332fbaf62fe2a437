"""Data sources through the datasets library: a save_to_disk folder (Dataset and DatasetDict), a
Hub-layout folder standing in for a Hub id (data.subset / data.split), the offline error, and
malformed rows in every source kind: one line naming the source and row, exit 2."""

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may wait on the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from swengine.config import DataConfig  # noqa: E402
from swengine.data.dataset import prepare  # noqa: E402
from swengine.data.sources import SourceSpec, open_source  # noqa: E402
from swengine.errors import UserError  # noqa: E402
from swengine.model.load import DEMO_MODEL, load_tokenizer  # noqa: E402
from tests.utils import run_main  # noqa: E402

ALPACA = [{"instruction": f"Reverse: w{i} x{i}", "input": "", "output": f"x{i} w{i}"} for i in range(12)]
TEXT = [{"text": f"the cat {i} sees the dog ."} for i in range(8)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(DEMO_MODEL))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"max_seq_len": 64, "eval_fraction": 0.0, "packing": False, **kw})


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "saved"))
    prep = prepare(cfg(), tok, str(tmp_path / "saved"), "", 0)
    assert prep.format == "alpaca" and len(prep.train) == len(ALPACA)
    assert tok.decode([t for t, lab in zip(prep.train[0].input_ids, prep.train[0].labels, strict=True) if lab != -100])
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA), "test": datasets.Dataset.from_list(TEXT)})
    both.save_to_disk(str(tmp_path / "dict"))
    assert prepare(cfg(split="test"), tok, str(tmp_path / "dict"), "", 0).format == "text"
    with pytest.raises(UserError, match=r"has no split 'dev' \(it has train, test\); set data.split"):
        prepare(cfg(split="dev"), tok, str(tmp_path / "dict"), "", 0)


def test_a_hub_layout_folder_stands_in_for_a_hub_id(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "org" / "name"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ALPACA), repo / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(ALPACA[:5]), repo / "data" / "test-00000-of-00001.parquet")  # never mixed in
    assert open_source(SourceSpec(str(repo))).kind == "hub"
    train = prepare(cfg(), tok, str(repo), "", 0)
    assert train.format == "alpaca" and len(train.train) == len(ALPACA)
    assert len(prepare(cfg(split="test"), tok, str(repo), "", 0).train) == 5
    with pytest.raises(UserError, match="check the path, data.subset and data.split"):
        prepare(cfg(split="nope"), tok, str(repo), "", 0)
    with pytest.raises(UserError, match="dataset file data/missing.jsonl not found"):  # a typo, not a Hub id
        open_source(SourceSpec("data/missing.jsonl"))
    # a plain directory of files (no data/ split layout) is still read file by file
    write_jsonl(tmp_path / "plain" / "train.jsonl", TEXT)
    assert open_source(SourceSpec(str(tmp_path / "plain"))).kind == "directory"


def test_data_subset_picks_a_configuration_of_a_hub_layout_folder(tmp_path, tok):
    repo = tmp_path / "repo"
    write_jsonl(repo / "alpaca" / "train.jsonl", ALPACA)
    write_jsonl(repo / "plain" / "train.jsonl", TEXT)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: alpaca\n  data_files: alpaca/*.jsonl\n"
                                    "- config_name: plain\n  data_files: plain/*.jsonl\n---\n# a dataset card\n")
    assert prepare(cfg(subset="alpaca"), tok, str(repo), "", 0).format == "alpaca"
    plain = prepare(cfg(subset="plain"), tok, str(repo), "", 0)
    assert plain.format == "text" and len(plain.train) == len(TEXT)


def test_a_hub_id_offline_without_a_cache_is_one_line_exit_2(tmp_path, tiny_llama, capsys):
    code, _, err = run_main(capsys, ["train", f"model.path={tiny_llama}", "data.train=nobody-here/no-such-dataset",
                                     "data.subset=en", f"output_dir={tmp_path / 'out'}", "schedule.max_steps=1", "data.max_seq_len=64"])
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "nobody-here/no-such-dataset" in line and "not in the local datasets cache" in line and "HF_HUB_OFFLINE" in line
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("rows,needle", [
    ([TEXT[0], {"txt": "no text field"}], r"row 1: field 'text' is null"),  # a missing column is null
    ([ALPACA[0], {"instruction": "x", "input": "", "output": None}], r"row 1: field 'output' is null; it must be a string"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cat"}]}, {"messages": []}],
     r"row 1: field 'messages' is empty; it must be a non-empty list"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "cat"}]}, {"conversations": []}],
     r"row 1: field 'conversations' is empty"),
])
def test_malformed_rows_in_a_saved_dataset_name_the_dataset_and_row(tmp_path, tok, rows, needle):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    with pytest.raises(UserError, match=needle) as exc:
        prepare(cfg(), tok, str(saved), "", 0)
    assert str(saved) in str(exc.value) and "\n" not in str(exc.value)
    assert len(prepare(cfg(max_bad_rows=1), tok, str(saved), "", 0).train) == 1  # allowed: left out, counted


def test_malformed_rows_in_every_source_kind_are_exit_2_from_the_cli(tmp_path, tiny_llama, capsys):
    import datasets

    bad = [TEXT[0], TEXT[1], {"text": None}]
    write_jsonl(tmp_path / "dir" / "part.jsonl", bad)
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "saved"))
    write_jsonl(tmp_path / "hub" / "data" / "train.jsonl", bad)
    for path, where in [(tmp_path / "dir", "part.jsonl:3"), (tmp_path / "saved", "saved row 2"),
                        (tmp_path / "hub", "row 2")]:
        code, _, err = run_main(capsys, ["train", f"model.path={tiny_llama}", f"data.train={path}",
                                         f"output_dir={tmp_path / 'out'}", "schedule.max_steps=1", "data.max_seq_len=64"])
        assert code == 2 and where in err and "field 'text' is null" in err, err
        assert len(err.strip().splitlines()) == 1


def test_training_from_a_saved_dataset_through_the_cli(tmp_path, tiny_llama, capsys):
    import datasets
    import torch

    from swengine.telemetry.logger import read_events

    torch.set_num_threads(1)
    datasets.Dataset.from_list(ALPACA * 3).save_to_disk(str(tmp_path / "saved"))
    code, _, err = run_main(capsys, ["train", f"model.path={tiny_llama}", f"data.train={tmp_path / 'saved'}",
                                     f"output_dir={tmp_path / 'out'}", "schedule.max_steps=1", "data.max_seq_len=64",
                                     "schedule.micro_batch_size=2", "logging.eval_every=0", "data.num_proc=2"])
    assert code == 0, err
    assert "(alpaca," in err and "tokenised 36 records in" in err
    (start,) = read_events(tmp_path / "out" / "metrics.jsonl", "run_start")
    assert start["data_format"] == "alpaca" and start["data_cache"].startswith("tokenised 36 records")
