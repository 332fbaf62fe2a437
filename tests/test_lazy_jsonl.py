"""JSON Lines read on demand equal the whole-file reader, at any indexing block size."""

import json
import random

import pytest

from swengine.data import lazy_jsonl
from swengine.data.lazy_jsonl import Concat, JsonlRecords
from swengine.data.records import read_records_located
from swengine.errors import UserError


def _random_file(path, rng: random.Random) -> None:
    lines = []
    for i in range(rng.randint(1, 40)):
        k = rng.random()
        if k < 0.1:
            lines.append(" \t\r")  # JSON whitespace: not a record
        elif k < 0.15:
            lines.append("")
        else:
            lines.append(json.dumps({"text": "a\u2028b\u0085" * rng.randint(0, 4), "i": i}, ensure_ascii=False))
    body = "\n".join(lines) + ("\n" if rng.random() < 0.5 else "")
    path.write_text(("\ufeff" if rng.random() < 0.3 else "") + body, encoding="utf-8")


@pytest.mark.parametrize("block", [1, 3, 7, 64, 1 << 20])
def test_lazy_records_equal_the_eager_reader(tmp_path, monkeypatch, block):
    monkeypatch.setattr(lazy_jsonl, "BLOCK", block)
    rng = random.Random(block)
    for trial in range(15):
        path = tmp_path / f"t{trial}.jsonl"
        _random_file(path, rng)
        try:
            expected = read_records_located(str(path))
        except UserError:
            with pytest.raises(UserError):
                JsonlRecords(str(path))
            continue
        lazy = JsonlRecords(str(path))
        assert lazy.slice(0, len(lazy)) == expected[0]
        assert [lazy.where[i] for i in range(len(lazy))] == expected[1]
        assert [lazy[i] for i in range(len(lazy))] == expected[0]


def test_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\n{"text": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:3 is not valid JSON"):
        JsonlRecords(str(path)).slice(0, 2)
    path.write_bytes(b'{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: every record must be a JSON object"):
        JsonlRecords(str(path)).slice(0, 2)
    path.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"bad.jsonl:1 is not UTF-8 text"):
        JsonlRecords(str(path)).slice(0, 1)
    path.write_bytes(b"\n \n")
    with pytest.raises(UserError, match="holds no records"):
        JsonlRecords(str(path))


def test_concat_slices_across_files(tmp_path):
    parts = []
    for k, n in enumerate((3, 1, 4)):
        path = tmp_path / f"{k}.jsonl"
        path.write_text("".join(json.dumps({"f": k, "i": i}) + "\n" for i in range(n)))
        parts.append(JsonlRecords(str(path)))
    concat = Concat(parts, [p.where for p in parts])
    assert len(concat) == 8
    assert [(r["f"], r["i"]) for r in concat.slice(2, 6)] == [(0, 2), (1, 0), (2, 0), (2, 1)]
    assert concat.where[3].endswith("1.jsonl:1") and concat[7] == {"f": 2, "i": 3}
