"""Formats, loss masks, packing and the resumable batch stream, with the demo tokenizer."""

import json

import pytest
import torch

from swengine.config import DataConfig
from swengine.data.batches import BatchStream, collate, pack
from swengine.data.dataset import prepare
from swengine.data.formats import IGNORE, Example, detect_format, to_example
from swengine.data.records import read_records
from swengine.errors import UserError
from swengine.model.load import DEMO_MODEL, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(DEMO_MODEL))


def trained_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])


def test_messages_train_only_the_assistant(tok):
    rec = {"messages": [{"role": "user", "content": "Repeat: cat dog"}, {"role": "assistant", "content": "cat dog"},
                        {"role": "user", "content": "Reverse: red fox"}, {"role": "assistant", "content": "fox red"}]}
    ex = to_example(rec, detect_format(rec), tok)
    assert trained_text(tok, ex) == " cat dog<|end|> fox red<|end|>"
    assert len(ex.input_ids) == len(ex.labels)


def test_alpaca_and_prompt_completion_use_the_chat_template(tok):
    a = to_example({"instruction": "Reverse", "input": "a b", "output": "b a"}, "alpaca", tok)
    p = to_example({"prompt": "Reverse a b", "completion": "b a"}, "prompt_completion", tok)
    assert trained_text(tok, a) == trained_text(tok, p) == " b a<|end|>"


def test_text_trains_everything_and_train_on_prompt(tok):
    ex = to_example({"text": "the cat sees the dog ."}, "text", tok)
    assert all(lab != IGNORE for lab in ex.labels)
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cat"}]}
    assert to_example(rec, "messages", tok, train_on_prompt=True).labels == to_example(rec, "messages", tok).input_ids


def test_format_detection_and_errors():
    assert detect_format({"instruction": "x", "output": "y"}) == "alpaca"
    assert detect_format({"prompt": "x", "completion": "y"}) == "prompt_completion"
    with pytest.raises(UserError, match="cannot tell the dataset format"):
        detect_format({"question": "x"})


def test_packing_restarts_positions_and_masks_boundaries():
    a, b = Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [IGNORE, 5])
    rows = pack([a, b, Example([6, 7, 8, 9], [6, 7, 8, 9])], seq_len=6, pad_id=0)
    assert rows[0].input_ids == [1, 2, 3, 4, 5, 0]
    assert rows[0].position_ids[:5] == [0, 1, 2, 0, 1]
    assert rows[0].labels == [IGNORE, 2, 3, IGNORE, 5, IGNORE]  # no label crosses a document boundary
    assert rows[1].input_ids[:4] == [6, 7, 8, 9] and rows[1].labels[0] == IGNORE


def test_collate_right_pads():
    rows = pack([Example([1, 2], [1, 2])], 4, pad_id=9)
    batch = collate(rows, pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 9, 9]] and batch["labels"][0, 2:].tolist() == [IGNORE] * 2


def test_batch_stream_is_deterministic_and_resumable():
    rows = pack([Example([i, i + 1], [i, i + 1]) for i in range(0, 40, 2)], 2, 0)
    a = BatchStream(rows, 3, seed=5, pad_id=0)
    seq = [a.next()["input_ids"].tolist() for _ in range(12)]  # crosses epochs
    b = BatchStream(rows, 3, seed=5, pad_id=0)
    for _ in range(5):
        b.next()
    state = b.state_dict()
    c = BatchStream(rows, 3, seed=5, pad_id=0)
    c.load_state_dict(state)
    assert [c.next()["input_ids"].tolist() for _ in range(7)] == seq[5:]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "txt"])
def test_readers(tmp_path, suffix):
    rows = [{"text": "a b c"}, {"text": "d e"}]
    p = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        p.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == "json":
        p.write_text(json.dumps(rows))
    elif suffix == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), p)
    else:
        p.write_text("a b c\n\nd e\n")
    assert read_records(str(p)) == rows


def test_missing_fields_name_the_file_and_fields(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"instruction": "z"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl: record 1 has no 'output' field"):
        prepare(DataConfig(), tok, str(p), "", 0)


def test_prepare_splits_and_counts(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"Repeat: cat {i}", "completion": f"cat {i}"}) for i in range(40)))
    prep = prepare(DataConfig(max_seq_len=64, eval_fraction=0.25), tok, str(p), "", 0)
    assert prep.format == "prompt_completion" and prep.train_examples == 30 and len(prep.eval) == 10
    assert all(len(r.input_ids) == 64 for r in prep.train)
    assert torch.tensor([r.labels for r in prep.eval[:1]]).ne(IGNORE).sum() > 0
