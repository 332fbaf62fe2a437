"""Tokenisation once, cached on disk: a second prepare is a cache hit with the same rows; the key
follows the data, the tokenizer and the settings; a damaged entry is rebuilt, an unfinished one
never trusted; num_proc gives the same tokens; rows are built lazily from memory-mapped arrow.
Slow: 200k records cold vs warm; the warm run's memory, in subprocesses."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from swengine.config import DataConfig
from swengine.data import cache as cache_mod
from swengine.data.batches import pack, unpacked
from swengine.data.dataset import prepare
from swengine.data.formats import detect_format, to_example
from swengine.data.records import read_records
from swengine.data.rows import LazyRows
from swengine.model.load import DEMO_MODEL, DEMO_TRAIN, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(DEMO_MODEL))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:40]) + "\n")
    return path


def cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"max_seq_len": 64, "eval_fraction": 0.0, "shuffle": False, "cache_dir": str(tmp_path / "c"),
                         **kw})


def entries(tmp_path) -> list[Path]:
    return sorted(p for p in (tmp_path / "c").iterdir() if not p.name.startswith("."))


def rows_of(prep):
    return [(r.input_ids, r.labels, r.position_ids, r.real_tokens) for r in prep.train]


def test_the_second_prepare_is_a_cache_hit_with_the_same_rows(tmp_path, data, tok):
    cold = prepare(cfg(tmp_path), tok, str(data), "", 0)
    assert cold.cache.startswith("tokenised 40 records in") and isinstance(cold.train, LazyRows)
    warm = prepare(cfg(tmp_path), tok, str(data), "", 0)
    assert warm.cache == "tokenised: cache hit"
    assert rows_of(warm) == rows_of(cold) and len(entries(tmp_path)) == 1
    # the lazy rows are the rows packing the examples in memory gives
    records = read_records(str(data))
    examples = [to_example(r, detect_format(records[0]), tok) for r in records]
    expected = pack(examples, 64, tok.pad_token_id)
    assert rows_of(warm) == [(r.input_ids, r.labels, r.position_ids, r.real_tokens) for r in expected]
    another_length = prepare(cfg(tmp_path, max_seq_len=32, packing=False), tok, str(data), "", 0)
    assert another_length.cache == "tokenised: cache hit"  # the cache holds whole examples: any length reuses it
    assert rows_of(another_length) == [(r.input_ids, r.labels, r.position_ids, r.real_tokens)
                                       for r in unpacked(examples, 32)]


def test_the_key_follows_data_tokenizer_and_settings(tmp_path, data, tok):
    prepare(cfg(tmp_path), tok, str(data), "", 0)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-2] + [lines[-1], lines[-2]]) + "\n")  # same size, new content
    assert not prepare(cfg(tmp_path), tok, str(data), "", 0).cache.endswith("hit")
    assert not prepare(cfg(tmp_path, train_on_prompt=True), tok, str(data), "", 0).cache.endswith("hit")
    assert not prepare(cfg(tmp_path, chat_template="chatml"), tok, str(data), "", 0).cache.endswith("hit")
    assert len(entries(tmp_path)) == 4
    assert prepare(cfg(tmp_path, train_on_prompt=True), tok, str(data), "", 0).cache.endswith("hit")


@pytest.mark.parametrize("damage", ["truncate", "meta", "missing", "flipped"])
def test_a_damaged_entry_is_rebuilt_and_an_unfinished_one_never_trusted(tmp_path, data, tok, damage):
    first = rows_of(prepare(cfg(tmp_path), tok, str(data), "", 0))
    (entry,) = entries(tmp_path)
    if damage == "truncate":
        blob = (entry / "tokens.arrow").read_bytes()
        (entry / "tokens.arrow").write_bytes(blob[:len(blob) // 2])
    elif damage == "flipped":  # same size, one byte of the tokens changed: only the CRC sees it
        blob = bytearray((entry / "tokens.arrow").read_bytes())
        blob[len(blob) // 3] ^= 0x5A
        (entry / "tokens.arrow").write_bytes(bytes(blob))
    elif damage == "meta":
        (entry / "meta.json").write_text("{")
    else:
        (entry / "meta.json").unlink()  # as a run killed before it wrote meta.json would leave it
    again = prepare(cfg(tmp_path), tok, str(data), "", 0)
    assert not again.cache.endswith("hit") and rows_of(again) == first
    assert prepare(cfg(tmp_path), tok, str(data), "", 0).cache.endswith("hit")


def test_a_killed_build_leaves_no_entry(tmp_path, data, tok, monkeypatch):
    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(tmp_path), tok, str(data), "", 0)
    assert not list((tmp_path / "c").iterdir())  # neither an entry nor a temporary folder


def test_a_hard_killed_builds_folder_is_swept_and_a_live_ones_kept(tmp_path, data, tok):
    """kill -9 leaves a temporary folder (no handler runs): the next build removes it when its
    process is gone, and keeps the folder of a build still running (another live process)."""
    root = tmp_path / "c"
    root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    gone, live = root / f".tmp-{'0' * 32}-{dead}-deadbeef", root / f".tmp-{'1' * 32}-{os.getpid()}-cafebabe"
    for folder in (gone, live):
        folder.mkdir()
        (folder / "tokens.arrow").write_bytes(b"partial")
    prepare(cfg(tmp_path), tok, str(data), "", 0)
    assert not gone.exists() and live.exists() and len(entries(tmp_path)) == 1


def test_num_proc_gives_the_same_tokens_and_the_progress_bar_is_on_stderr(tmp_path, data, tok, monkeypatch, capsys):
    monkeypatch.setattr(cache_mod, "CHUNK", 7)  # several chunks for two processes
    one = rows_of(prepare(cfg(tmp_path / "one"), tok, str(data), "", 0))
    capsys.readouterr()
    two = prepare(cfg(tmp_path / "two", num_proc=2), tok, str(data), "", 0, progress=True)
    out, err = capsys.readouterr()
    assert rows_of(two) == one
    assert "tokenising" in err and not out


def test_bad_cache_settings_are_one_line(tmp_path, data, tok):
    from swengine.errors import UserError

    with pytest.raises(UserError, match="data.num_proc=0: it must be at least 1"):
        prepare(cfg(tmp_path, num_proc=0), tok, str(data), "", 0)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="data.cache_dir .* cannot be created"):
        prepare(cfg(tmp_path, cache_dir=str(tmp_path / "file" / "sub")), tok, str(data), "", 0)


def test_eval_split_and_shuffle_follow_the_seed_from_the_cache(tmp_path, data, tok):
    a = prepare(cfg(tmp_path, eval_fraction=0.25, shuffle=True), tok, str(data), "", 1)
    b = prepare(cfg(tmp_path, eval_fraction=0.25, shuffle=True), tok, str(data), "", 1)
    c = prepare(cfg(tmp_path, eval_fraction=0.25, shuffle=True), tok, str(data), "", 2)
    assert b.cache.endswith("hit") and rows_of(a) == rows_of(b) and rows_of(a) != rows_of(c)
    assert len(a.eval) == 10 and a.train_examples == 30


BIG = 200_000


def write_big(path: Path, n: int = BIG) -> Path:
    words = "the cat dog sees red fox a b".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(3 + i % 9))}) + "\n")
    return path


WARM_RUN = textwrap.dedent("""
    import json, sys, time
    from swengine.config import DataConfig
    from swengine.data.dataset import prepare
    from swengine.model.load import DEMO_MODEL, load_tokenizer

    def anon_mib():  # private memory: memory-mapped file pages (which the kernel can drop) are not in it
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon:")) / 1024

    tok = load_tokenizer(str(DEMO_MODEL))
    before = anon_mib()
    t = time.perf_counter()
    prep = prepare(DataConfig(max_seq_len=int(sys.argv[3]), cache_dir=sys.argv[2]), tok, sys.argv[1], "", 0)
    seconds = time.perf_counter() - t
    rows = len(prep.train)
    for i in range(0, rows, max(1, rows // 50)):
        prep.train[i]
    print(json.dumps({"cache": prep.cache, "seconds": seconds, "rows": rows, "examples": prep.train_examples,
                      "anon_growth_mib": anon_mib() - before}))
""")


def warm_run(path: Path, cache: Path, seq_len: int) -> dict:
    run = subprocess.run([sys.executable, "-c", WARM_RUN, str(path), str(cache), str(seq_len)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_200k_records_tokenise_once_and_the_second_start_takes_seconds(tmp_path, tok):
    path = write_big(tmp_path / "big.jsonl")
    t = time.perf_counter()
    cold = prepare(DataConfig(max_seq_len=256, cache_dir=str(tmp_path / "c"), num_proc=2), tok, str(path), "", 0)
    cold_s = time.perf_counter() - t
    assert cold.cache.startswith("tokenised 200,000 records")
    warm = warm_run(path, tmp_path / "c", 256)
    assert warm["cache"] == "tokenised: cache hit" and warm["rows"] == len(cold.train)
    assert warm["seconds"] < 5 and warm["seconds"] < cold_s / 3, (warm, cold_s)


@pytest.mark.slow
def test_memory_stays_bounded_the_tokens_stay_on_disk(tmp_path, tok):
    """The private memory a warm prepare keeps grows by far less per example than the example's
    tokens (compared between two dataset sizes, so fixed costs cancel): they stay memory-mapped."""
    growth, token_bytes = {}, {}
    for n in (8_000, 24_000):
        path = write_long(tmp_path / f"long{n}.jsonl", n)
        cache = tmp_path / f"c{n}"
        prepare(DataConfig(max_seq_len=512, cache_dir=str(cache), num_proc=2), tok, str(path), "", 0)
        (entry,) = cache.iterdir()
        token_bytes[n] = (entry / "tokens.arrow").stat().st_size
        warm = warm_run(path, cache, 512)
        assert warm["cache"] == "tokenised: cache hit" and warm["examples"] > 0.9 * n
        growth[n] = warm["anon_growth_mib"] * 2**20
    per_example = (growth[24_000] - growth[8_000]) / 16_000
    stored = (token_bytes[24_000] - token_bytes[8_000]) / 16_000  # int32 ids + labels: what RAM would hold
    assert stored > 1000 and per_example < stored / 10, (per_example, stored, growth)


def write_long(path: Path, n: int) -> Path:
    words = "the cat dog sees red fox a b".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(words[(i * 7 + k) % len(words)] for k in range(150))}) + "\n")
    return path



def test_a_cold_run_reads_a_jsonl_file_a_chunk_at_a_time(tmp_path, data, tok, monkeypatch):
    """Tokenising a .jsonl (a cache miss) never holds the file's records: they are read and parsed
    a chunk at a time from a byte index, and give exactly the rows the whole-file reader gives."""
    from swengine.data import lazy_jsonl

    eager = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(eager[i % len(eager)]) + "\n" for i in range(2500)))
    widest, real_slice = [0], lazy_jsonl.JsonlRecords.slice

    def slice_(self, start, end):
        widest[0] = max(widest[0], min(end, len(self)) - start)
        return real_slice(self, start, end)

    monkeypatch.setattr(lazy_jsonl.JsonlRecords, "slice", slice_)
    monkeypatch.setattr(cache_mod, "CHUNK", 300)
    lazy = prepare(cfg(tmp_path), tok, str(big), "", 0)
    assert 0 < widest[0] <= 300
    monkeypatch.setattr(lazy_jsonl.JsonlRecords, "slice", real_slice)
    whole = tmp_path / "whole.json"  # the same records through the whole-file (.json) reader
    whole.write_text(json.dumps([json.loads(line) for line in big.read_text().splitlines()]))
    assert rows_of(lazy) == rows_of(prepare(cfg(tmp_path / "w"), tok, str(whole), "", 0))
