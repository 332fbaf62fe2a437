"""Data preparation for 200k records before and after the tokenised cache, side by side in one run.

Both sides run ``swengine.data.dataset.prepare`` (what `swengine train` runs before the model
loads) on the same synthetic 200,000-record text dataset with the demo tokenizer, packed at 256
tokens: "cold" with an empty cache directory (read, check, tokenise, write the cache, pack),
"warm" with the cache in place (open the memory-mapped entry, pack). The ratio is what the cache
saves a second run; the bench itself fails if warm is not under half of cold (a margin far beyond
the noise of a shared machine). ``extra_info``: records, rows, the growth of the warm
prepare's private memory (RssAnon: memory-mapped tokens are not in it) and the peak RSS of that
process, measured in a fresh subprocess, so the cold run's memory does not hide it.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.harness import BASELINE, OURS

RECORDS = 200_000
SHAPE = f"{RECORDS // 1000}k text records S256"
GROUP = f"data-prepare @ {SHAPE}"
ROOT = Path(__file__).resolve().parents[1]
_SECONDS: dict[str, float] = {}

WARM_MEMORY = textwrap.dedent("""
    import json, resource, sys
    from swengine.config import DataConfig
    from swengine.data.dataset import prepare
    from swengine.model.load import DEMO_MODEL, load_tokenizer

    def anon():  # private memory, bytes (memory-mapped file pages are not in it)
        return 1024 * next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon:"))

    tok = load_tokenizer(str(DEMO_MODEL))
    before = anon()
    prep = prepare(DataConfig(max_seq_len=256, cache_dir=sys.argv[2]), tok, sys.argv[1], "", 0)
    prep.train[0], prep.train[len(prep.train) - 1]
    print(json.dumps({"cache": prep.cache, "anon_growth_bytes": anon() - before,
                      "peak_rss_bytes": 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from swengine.model.load import DEMO_MODEL, load_tokenizer

    root = tmp_path_factory.mktemp("data-bench")
    path = root / "train.jsonl"
    words = "the cat dog sees red fox a b".split()
    with open(path, "w") as f:
        for i in range(RECORDS):
            f.write(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(3 + i % 9))}) + "\n")
    return {"path": path, "cache": root / "cache", "tok": load_tokenizer(str(DEMO_MODEL))}


def _prepare(setup):
    from swengine.config import DataConfig
    from swengine.data.dataset import prepare

    return prepare(DataConfig(max_seq_len=256, cache_dir=str(setup["cache"])), setup["tok"], str(setup["path"]), "", 0)


@pytest.mark.parametrize("provider", ["cold (no cache)", "warm (cache hit)"])
def test_prepare(benchmark, setup, provider):
    cold = provider.startswith("cold")
    info = benchmark.extra_info
    info.update(op="data-prepare", provider=provider, role=BASELINE if cold else OURS, shape=SHAPE, device="cpu",
                smoke=False, records=RECORDS)
    benchmark.group = GROUP
    if cold:  # one round: each is a full tokenisation of 200k records
        prep = benchmark.pedantic(lambda: _prepare(setup), setup=lambda: shutil.rmtree(setup["cache"], True),
                                  rounds=1, iterations=1)
        assert prep.cache.startswith(f"tokenised {RECORDS:,} records")
    else:
        if not setup["cache"].exists():
            _prepare(setup)
        prep = benchmark.pedantic(lambda: _prepare(setup), rounds=3, iterations=1)
        assert prep.cache == "tokenised: cache hit"
        run = subprocess.run([sys.executable, "-c", WARM_MEMORY, str(setup["path"]), str(setup["cache"])],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-2000:]
        info.update(json.loads(run.stdout.strip().splitlines()[-1]))
    info["rows"] = len(prep.train)
    _SECONDS[provider] = benchmark.stats.stats.min
    if len(_SECONDS) == 2:
        warm, cold_s = _SECONDS["warm (cache hit)"], _SECONDS["cold (no cache)"]
        assert warm < 0.5 * cold_s, f"a cache hit ({warm:.2f} s) should take well under half a cold prepare ({cold_s:.2f} s)"
