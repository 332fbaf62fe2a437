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


# ---------------------------------------------------------------- issue 13, item 7: reader, field types, truncation

def test_jsonl_splits_records_on_newline_only(tmp_path, tok):
    rows = [{"text": "one\u2028line"}, {"text": "next\u0085line\x0bx\x0cy\x1c\x1d\x1e"}, {"text": "plain"}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n\n", encoding="utf-8")
    assert read_records(str(p)) == rows
    prep = prepare(DataConfig(max_seq_len=64, eval_fraction=0), tok, str(p), "", 0)
    assert prep.train_examples == 3


def test_utf8_bom_and_non_utf8_data(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a"}).encode() + b"\n")
    assert read_records(str(p)) == [{"text": "a"}]
    for suffix in ("jsonl", "json", "txt"):
        bad = tmp_path / f"latin1.{suffix}"
        bad.write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1"))
        with pytest.raises(UserError, match=rf"latin1.{suffix}:2 is not UTF-8 text"):
            read_records(str(bad))


@pytest.mark.parametrize("record,needle", [
    ({"text": None}, "field 'text' is null"),
    ({"text": ["x"]}, "field 'text' is a list"),
    ({"text": 3}, "field 'text' is a int"),
    ({"prompt": "p", "completion": None}, "field 'completion' is null"),
    ({"instruction": "i", "input": 5, "output": "o"}, "field 'input' is a int"),
    ({"instruction": {"a": 1}, "output": "o"}, "field 'instruction' is an object"),
    ({"messages": None}, "field 'messages' is null"),
    ({"messages": []}, "field 'messages' is empty"),
    ({"messages": [{"role": "user", "content": None}]}, r"messages\[0\].content is null"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with 'role' and 'content'"),
])
def test_null_or_non_string_fields_name_file_and_line(tmp_path, tok, record, needle):
    p = tmp_path / "d.jsonl"
    good = {k: ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] if k == "messages" else "x")
            for k in record}
    good.setdefault("output", "o") if "instruction" in record else None
    p.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=rf"d.jsonl:3: {needle}"):
        prepare(DataConfig(max_seq_len=64), tok, str(p), "", 0)


def _long_data(tmp_path, n_long=3, n_short=20, n_long_prompt=0):
    p = tmp_path / "d.jsonl"
    rows = [{"prompt": f"Repeat: cat {i}", "completion": f"cat {i}"} for i in range(n_short)]
    for i in range(n_long):
        rows.insert(5 + i, {"prompt": "Repeat: dog", "completion": "cat " * 60})
    for _ in range(n_long_prompt):  # truncation leaves nothing to learn
        rows.append({"prompt": "Repeat: " + "dog " * 60, "completion": "cat"})
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_truncate_default_truncates_and_counts(tmp_path, tok):
    p = _long_data(tmp_path, n_long_prompt=1)
    prep = prepare(DataConfig(max_seq_len=32, eval_fraction=0, packing=False), tok, str(p), "", 0)
    assert DataConfig().truncate == "truncate"
    assert prep.truncated == 3 and prep.dropped == 1 and prep.train_examples == 23
    assert max(len(r.input_ids) for r in prep.train) == 32
    assert prep.length_summary.startswith("3 training records truncated, 1 training record dropped (longer than "
                                          "data.max_seq_len=32")
    fits = prepare(DataConfig(max_seq_len=512, eval_fraction=0), tok, str(p), "", 0)
    assert fits.truncated == 0 and fits.length_summary == ""


def test_truncate_drop_leaves_long_records_out(tmp_path, tok):
    p = _long_data(tmp_path)
    prep = prepare(DataConfig(max_seq_len=32, eval_fraction=0, packing=False, truncate="drop"), tok, str(p), "", 0)
    assert prep.dropped == 3 and prep.truncated == 0 and prep.train_examples == 20
    assert max(len(r.input_ids) for r in prep.train) < 32
    assert "3 training records dropped" in prep.length_summary
    only_long = tmp_path / "long.jsonl"
    only_long.write_text(json.dumps({"text": "cat " * 100}) + "\n")
    with pytest.raises(UserError, match="data.truncate=drop left none"):
        prepare(DataConfig(max_seq_len=32, eval_fraction=0, truncate="drop"), tok, str(only_long), "", 0)


def test_truncate_error_names_the_count_and_the_first(tmp_path, tok):
    p = _long_data(tmp_path)
    with pytest.raises(UserError, match=r"3 of 23 training records are longer than data.max_seq_len=32 tokens "
                                        r"\(first: .*d.jsonl:6, \d+ tokens\)"):
        prepare(DataConfig(max_seq_len=32, eval_fraction=0, truncate="error"), tok, str(p), "", 0)
    assert prepare(DataConfig(max_seq_len=512, eval_fraction=0, truncate="error"), tok, str(p), "", 0).truncated == 0


def test_truncate_applies_to_eval_records(tmp_path, tok):
    p = _long_data(tmp_path, n_long=0)
    ev = _long_data(tmp_path / "..", n_long=2, n_short=3)
    prep = prepare(DataConfig(max_seq_len=32, truncate="drop"), tok, str(p), str(ev), 0)
    assert prep.eval_truncated == 2 and len(prep.eval) == 3 and "2 eval records dropped" in prep.length_summary


def test_run_start_line_reports_truncated_records(tmp_path):
    """The truncation count reaches the user: run-start line and telemetry."""
    import swkernels
    from swengine.config import load_config
    from swengine.model.load import DEMO_TRAIN
    from swengine.telemetry import read_events
    from swengine.train.trainer import Trainer

    data = tmp_path / "long.jsonl"
    rows = DEMO_TRAIN.read_text().splitlines()[:40]
    data.write_text("\n".join(rows) + "\n")
    lines = []
    cfg = load_config(None, [f"data.train={data}", f"output_dir={tmp_path / 'run'}", "data.max_seq_len=12", "data.train_on_prompt=true",
                             "schedule.max_steps=1", "logging.eval_every=0", "checkpointing.save_every=0",
                             "data.eval_fraction=0.1"])
    with swkernels.force_backend("torch"):  # the loop, not the interpreted kernels, is under test
        Trainer(cfg, log=lines.append).run()
    start = next(line for line in lines if "training rows" in line)
    assert "training records truncated" in start and "(longer than data.max_seq_len=12; data.truncate=truncate)" in start
    [event] = read_events(tmp_path / "run" / "metrics.jsonl", "run_start")
    assert event["truncated_records"] > 0


def test_sharegpt_is_detected_and_trains_like_messages(tok, tmp_path):
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Reverse: red fox"},
             {"from": "gpt", "value": "fox red"}]
    rec = {"conversations": turns}
    assert detect_format(rec) == "sharegpt"
    messages = [{"role": r, "content": t["value"]} for r, t in zip(("system", "user", "assistant"), turns, strict=True)]
    ours, ref = to_example(rec, "sharegpt", tok), to_example({"messages": messages}, "messages", tok)
    assert ours == ref and trained_text(tok, ours).strip().startswith("fox red")
    path = tmp_path / "sg.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"sg.jsonl:2: conversations\[0\].from is 'robot'"):
        prepare(DataConfig(max_seq_len=64, eval_fraction=0.0), tok, str(path), "", 0)


def test_best_fit_packing_uses_fewer_rows_and_keeps_every_token():
    from swengine.data.batches import pack_best_fit, padding_ratio

    lengths = [7, 6, 5, 4, 3, 3, 2, 2, 1, 1, 6, 2]
    docs = [Example(list(range(10 * i, 10 * i + n)), list(range(10 * i, 10 * i + n))) for i, n in enumerate(lengths)]
    greedy, best = pack(docs, 8, 0), pack_best_fit(docs, 8, 0)
    assert len(best) == 6 < len(greedy) == 7  # 42 tokens in rows of 8: 6 is the minimum
    assert padding_ratio(best) < padding_ratio(greedy)
    kept = sorted(t for r in best for t in r.input_ids[:r.real_tokens])
    assert kept == sorted(t for d in docs for t in d.input_ids)  # every document token, once
    for r in best:  # positions restart per document; no label crosses a boundary
        starts = [i for i, p in enumerate(r.position_ids[:r.real_tokens]) if p == 0]
        assert all(r.labels[i] == IGNORE for i in starts)


def test_chat_template_override_and_the_prefix_check(tok, tmp_path):
    rec = {"messages": [{"role": "user", "content": "Reverse: red fox"}, {"role": "assistant", "content": "fox red"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    cfg = DataConfig(max_seq_len=128, eval_fraction=0.0, packing=False, chat_template="chatml")
    row = prepare(cfg, tok, str(path), "", 0).train[0]
    text = tok.decode(row.input_ids)
    assert text.strip().startswith("<|im_start|>user") and "<|im_start|>assistant" in text
    assert tok.decode([t for t, lab in zip(row.input_ids, row.labels, strict=True) if lab != IGNORE]).startswith(
        "fox red<|im_end|>")
    assert tok.chat_template and "<|im_start|>" not in tok.chat_template  # the tokenizer itself is untouched
    jinja = tmp_path / "odd.jinja"  # renders a user-ended prefix with a footer the whole conversation lacks
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                     "{% if messages[-1]['role'] == 'user' %}(reply){% endif %}"
                     "{% if add_generation_prompt %}[assistant]{% endif %}")
    with pytest.raises(UserError, match=r"chat.jsonl:1: the chat template renders the conversation up to turn 1"):
        prepare(DataConfig(max_seq_len=128, eval_fraction=0.0, chat_template=str(jinja)), tok, str(path), "", 0)
    with pytest.raises(UserError, match="neither a bundled template \\(chatml, llama3\\) nor a jinja file"):
        prepare(DataConfig(max_seq_len=128, eval_fraction=0.0, chat_template="vicuna"), tok, str(path), "", 0)


def test_a_directory_of_files_is_one_dataset(tmp_path, tok):
    root = tmp_path / "data"
    (root / "b").mkdir(parents=True)
    (root / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
    (root / "b" / "c.txt").write_text("two\n\nthree\n")
    (root / ".hidden.jsonl").write_text("not json\n")  # dot-files are left out
    (root / "notes.md").write_text("ignored")
    from swengine.data.records import read_records_located

    rows, where = read_records_located(str(root))
    assert [r["text"] for r in rows] == ["one", "two", "three"]
    assert where[0].endswith("a.jsonl:1") and "c.txt record 1" in where[2]
    assert len(prepare(DataConfig(max_seq_len=32, eval_fraction=0.0), tok, str(root), "", 0).train) >= 1
    (root / "a.jsonl").write_text("{bad\n")
    with pytest.raises(UserError, match="a.jsonl:1 is not valid JSON"):
        read_records_located(str(root))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no .jsonl/.json/.parquet/.txt files"):
        read_records_located(str(empty))


def test_max_bad_rows_leaves_out_at_most_that_many_malformed_records(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    good = {"prompt": "Reverse: a b", "completion": "b a"}
    path.write_text("\n".join(json.dumps(r) for r in [good, {"prompt": "x"}, good, {"prompt": 3, "completion": "y"},
                                                      good]) + "\n")
    cfg = DataConfig(max_seq_len=64, eval_fraction=0.0, packing=False)
    with pytest.raises(UserError, match=r"record 1 has no 'completion' field at .*mixed.jsonl:2"):
        prepare(cfg, tok, str(path), "", 0)  # the default allows none
    with pytest.raises(UserError, match=r"mixed.jsonl:2.*\(2 malformed, data.max_bad_rows=1\)"):
        prepare(DataConfig(max_seq_len=64, eval_fraction=0.0, max_bad_rows=1), tok, str(path), "", 0)
    data = prepare(DataConfig(max_seq_len=64, eval_fraction=0.0, packing=False, max_bad_rows=2), tok, str(path), "", 0)
    assert len(data.train) == 3 and data.malformed == 2
    assert "2 malformed records left out (data.max_bad_rows)" in data.length_summary
