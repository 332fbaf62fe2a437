"""`swengine eval`: sliding-window perplexity against a brute-force computation, passkey prompts and
scoring exact, loading a run with its recorded RoPE scaling and adapter, the JSON schema, and
one-line errors (exit 2)."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
import torch.nn.functional as F
import typer
import yaml
from torch import nn
from typer.testing import CliRunner

import swkernels
from swengine.errors import UserError
from swengine.eval import passkey
from swengine.eval.cli import eval_command, parse_depths, parse_lengths
from swengine.eval.perplexity import fill_to, plan_windows, sliding_window_nll, token_stream
from swengine.model.load import DEMO_MODEL

SCHEMA = json.loads((Path(__file__).parents[1] / "specs" / "eval.schema.json").read_text())
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP's spinning
    threads make each small matmul 20-100x slower; restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=508, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (max 128 positions) with the demo tokenizer, saved like any HF model."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny") / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_MODEL / name, out / name)
    return out


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory) -> Path:
    """What `swengine train` leaves: adapter/ (PEFT format, non-zero B) and the run's config, which
    recorded a linear RoPE scaling ×2."""
    from transformers import AutoModelForCausalLM

    from swengine.model.adapter import save_adapter
    from swengine.model.patch import LoraSpec, patch

    run = tmp_path_factory.mktemp("run") / "run"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    handle = patch(model, spec, kernels=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in handle.lora.values():
            layer.lora_B.weight.normal_(0, 0.5)
    save_adapter(handle, spec, run / "adapter", str(model_dir))
    step = run / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    (step / "config.yaml").write_text(yaml.safe_dump({"context": {"rope_scaling": {"rope_type": "linear",
                                                                                   "factor": 2.0}}}))
    return run


class Result:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.exit_code, self.stdout, self.stderr = code, stdout, stderr


def invoke(*args: str) -> Result:
    """The command mounted as swengine/cli.py mounts it (app.command("eval")(eval_command)), with a
    UserError ending as swengine.cli.main ends it: "error: <message>" on stderr, exit code 2."""
    app = typer.Typer()
    app.command("eval")(eval_command)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps Typer in subcommand mode
        pass

    r = CliRunner().invoke(app, ["eval", *args])
    if isinstance(r.exception, UserError):
        return Result(2, r.stdout, r.stderr + f"error: {r.exception}\n")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Result(r.exit_code, r.stdout, r.stderr)


# ---------------------------------------------------------------- sliding windows


@pytest.mark.parametrize("n,window,stride", [(100, 32, 16), (100, 32, 11), (100, 30, 30), (37, 8, 3), (10, 64, 32),
                                             (64, 64, 32)])
def test_windows_score_every_token_once(n, window, stride):
    scored = []
    for w in plan_windows(n, window, stride):
        assert w.end - w.begin <= window and w.begin < w.first < w.end <= n
        scored += range(w.first, w.end)
    assert len(scored) == len(set(scored))
    if stride < window:
        assert scored == list(range(1, n))  # every token but the first, in order
    else:  # disjoint windows: a window's first token has no context
        assert set(scored) == set(range(1, n)) - set(range(0, n, window))


def hf_doc_nll(model, ids: torch.Tensor, window: int, stride: int,
               targets: torch.Tensor | None = None) -> tuple[float, int]:
    """The Hugging Face docs' "perplexity of fixed-length models" loop, on full logits (tokens
    where ``targets`` is False are labelled -100 as well)."""
    total, count, prev_end, n = 0.0, 0, 0, ids.numel()
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + window, n)
            trg_len = end - prev_end
            x = ids[begin:end][None]
            target = x.clone()
            target[:, :-trg_len] = -100
            if targets is not None:
                target[0, ~targets[begin:end]] = -100
            logits = model(x).logits.float()
            labels = target[:, 1:].reshape(-1)
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels, reduction="sum").item()
            count += int((labels != -100).sum())
            prev_end = end
            if end == n:
                break
    return total, count


@pytest.fixture(scope="module")
def tiny_pair():
    """(transformers' model, the same weights patched with our kernels)."""
    from transformers import AutoModelForCausalLM

    from swengine.model.patch import patch

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(tiny_config(max_position_embeddings=256), attn_implementation="sdpa").eval()
    ours = copy.deepcopy(ref)
    handle = patch(ours)
    assert not handle.kept
    return ref, ours.eval()


@pytest.mark.parametrize("n,window,stride", [(96, 32, 16), (96, 32, 11), (97, 40, 40), (50, 64, 32), (96, 96, 48)])
def test_perplexity_equals_brute_force(tiny_pair, n, window, stride):
    ref, ours = tiny_pair
    ids = torch.randint(3, 508, (n,), generator=torch.Generator().manual_seed(n + window + stride))
    with swkernels.force_backend("torch"):
        got = sliding_window_nll(ours, ids.tolist(), window, stride)
    want, count = hf_doc_nll(ref, ids, window, stride)
    scored = sum(w.end - w.first for w in plan_windows(n, window, stride))
    if stride < window:
        assert got.tokens == count == n - 1
    else:  # the docs' loop labels each window's first token and then drops it with the shift, as we do
        assert got.tokens == count == scored
    assert got.nll_sum == pytest.approx(want, rel=1e-5)
    assert got.windows == len(plan_windows(n, window, stride))


def test_perplexity_scores_only_target_tokens(tiny_pair):
    """Instruction data counts completions only: the same windows, prompts labelled -100."""
    ref, ours = tiny_pair
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 508, (90,), generator=gen)
    targets = torch.rand(90, generator=gen) < 0.4
    with swkernels.force_backend("torch"):
        got = sliding_window_nll(ours, ids.tolist(), 32, 13, targets=targets.tolist())
    want, count = hf_doc_nll(ref, ids, 32, 13, targets)
    assert got.tokens == count == int(targets[1:].sum())
    assert got.nll_sum == pytest.approx(want, rel=1e-5)


def test_perplexity_under_the_triton_interpreter(tiny_pair):
    """The same number with every swkernels op (RoPE, RMSNorm, SiLU·mul, fused linear CE) interpreted."""
    ref, ours = tiny_pair
    ids = torch.randint(3, 508, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    with swkernels.force_backend("triton"):
        got = sliding_window_nll(ours, ids, 12, 6)
    want, count = hf_doc_nll(ref, torch.tensor(ids), 12, 6)
    assert got.tokens == count == 11
    assert got.nll_sum == pytest.approx(want, rel=1e-4)


def test_fill_to_repeats_short_data():
    assert fill_to([1, 2, 3], 2) == ([1, 2, 3], 1.0)
    assert fill_to([1, 2, 3], 7) == ([1, 2, 3, 1, 2, 3, 1], 7 / 3)


def test_token_stream_concatenates_records(tokenizer, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "the grass is green"}\n{"text": "the sky"}\n')
    s = token_stream(str(p), tokenizer)
    one = [1, *tokenizer("the grass is green", add_special_tokens=False)["input_ids"], 2]
    two = [1, *tokenizer("the sky", add_special_tokens=False)["input_ids"], 2]
    assert s.ids == one + two and s.documents == 2 and s.format == "text"
    assert all(s.targets) and s.scored == len(s.ids) - 1  # text: every token counts
    first = token_stream(str(p), tokenizer, max_tokens=3)
    assert first.ids == one[:3] and first.documents == 1


def test_token_stream_scores_completions_as_training_does(tokenizer, tmp_path):
    from swengine.data.formats import to_example

    p = tmp_path / "chat.jsonl"
    rec = {"messages": [{"role": "user", "content": "Reverse: red fish"},
                        {"role": "assistant", "content": "fish red"}]}
    p.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    ex = to_example(rec, "messages", tokenizer)
    s = token_stream(str(p), tokenizer)
    assert s.format == "messages" and s.ids == ex.input_ids * 2
    assert s.targets == [label != -100 for label in ex.labels] * 2 and 0 < s.scored < len(s.ids) - 1
    assert token_stream(str(p), tokenizer, all_tokens=True).scored == len(s.ids) - 1


def test_data_too_small_is_one_line(tmp_path):
    class NoSpecials:  # a tokenizer without bos/eos, on a one-character text: one token
        bos_token_id = eos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [5] * len(text)}

    p = tmp_path / "tiny.txt"
    p.write_text("a\n")
    with pytest.raises(UserError, match="too little to fill even one window"):
        token_stream(str(p), NoSpecials())


# ---------------------------------------------------------------- passkey prompts


@pytest.mark.parametrize("length", [200, 333, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_prompt(tokenizer, length, depth):
    key = passkey.make_passkey(0, length, depth, 0)
    p = passkey.build_prompt(tokenizer, length, depth, key)
    line = passkey.passkey_line(key)
    lines = p.text.split("\n")
    assert lines[0] == passkey.TASK and lines[-1] == passkey.QUESTION
    assert p.text.count(line) == 1 and p.text.count(key) == 2  # the key only in its line
    assert p.before == round(depth * p.n_filler)
    head, tail = p.text.split(line)
    filler_before = re.findall(r"[A-Z][^.]*\.", head.removeprefix(passkey.TASK))
    filler_after = re.findall(r"[A-Z][^.?]*\.", tail.removesuffix(passkey.QUESTION))
    assert len(filler_before) == p.before and len(filler_after) == p.n_filler - p.before
    if depth == 0.0:
        assert lines[1] == line
    if depth == 1.0:
        assert lines[-2] == line
    # bos + prompt + " NNNNN", as long as fits: one more filler sentence would not
    longest = max(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in passkey.FILLER)
    assert length - longest - 2 <= len(p.input_ids) <= length
    assert p.input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(p.answer_ids).strip() == key
    assert p.input_ids[:p.answer_start] == [1, *tokenizer(p.text, add_special_tokens=False)["input_ids"]]


def test_long_prompt_needs_few_tokenizations(tokenizer, monkeypatch):
    """The filler count converges in a few whole-prompt tokenizations, not one per sentence (at 32K
    that was ~200 of them: 8 s with the demo tokenizer)."""
    calls = []
    encode = passkey.encode
    monkeypatch.setattr(passkey, "encode", lambda *a: calls.append(1) or encode(*a))
    p = passkey.build_prompt(tokenizer, 32768, 0.5, "12345")
    assert 32768 - 12 <= len(p.input_ids) <= 32768 and len(calls) <= 10


def test_passkeys_are_seeded():
    keys = [passkey.make_passkey(0, 256, 0.5, t) for t in range(5)]
    assert keys == [passkey.make_passkey(0, 256, 0.5, t) for t in range(5)]
    assert len(set(keys)) == 5 and all(len(k) == 5 and k.isdigit() for k in keys)
    assert keys[0] == "16079"  # str seeds hash with SHA-512: the same in every process and Python version
    assert passkey.make_passkey(1, 256, 0.5, 0) != keys[0]


def test_passkey_too_short(tokenizer):
    shortest = passkey.min_length(tokenizer)
    assert passkey.build_prompt(tokenizer, shortest - 1, 0.5, "12345") is None
    assert passkey.build_prompt(tokenizer, shortest, 0.5, "12345").n_filler == 0


# ---------------------------------------------------------------- passkey scoring


class _Decoder(nn.Module):
    """Hidden state at position t = one-hot of the token the stand-in predicts next."""

    def __init__(self, vocab: int, wrong_at: set[int]):
        super().__init__()
        self.vocab, self.wrong_at = vocab, wrong_at

    def forward(self, input_ids, use_cache=False):
        nxt = torch.roll(input_ids, -1, dims=1)  # it "knows" the answer: the next token
        for t in self.wrong_at:
            nxt[:, t] = (nxt[:, t] + 1) % self.vocab
        return type("Out", (), {"last_hidden_state": F.one_hot(nxt, self.vocab).float()})


class StandIn(nn.Module):
    """A causal LM whose greedy predictions are known: right everywhere except ``wrong_at``."""

    def __init__(self, vocab: int, wrong_at: set[int] = frozenset()):
        super().__init__()
        self.decoder = _Decoder(vocab, set(wrong_at))
        self.head = nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(vocab))
        self.rows = []
        self.head.register_forward_hook(lambda _m, inp, _o: self.rows.append(inp[0].shape[0]))

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


def test_scorer_exact(tokenizer):
    p = passkey.build_prompt(tokenizer, 300, 0.5, "48213")
    n_answer = len(p.answer_ids)
    right = StandIn(len(tokenizer))
    assert passkey.score(right, p) == p.answer_ids
    assert right.rows == [n_answer]  # logits only at the answer positions
    for k in range(n_answer):  # wrong at any one answer position: not the pass key
        wrong = StandIn(len(tokenizer), {p.answer_start - 1 + k})
        predicted = passkey.score(wrong, p)
        assert predicted != p.answer_ids and sum(a != b for a, b in zip(predicted, p.answer_ids, strict=True)) == 1
    # wrong only outside the answer (e.g. on the prompt's own tokens): still right
    assert passkey.score(StandIn(len(tokenizer), {0, p.answer_start - 2}), p) == p.answer_ids


def test_evaluate_depth_counts(tokenizer):
    res = passkey.evaluate_depth(StandIn(len(tokenizer)), tokenizer, 256, 0.25, 3, seed=7)
    assert (res.trials, res.correct, res.accuracy) == (3, 3, 1.0)
    assert [s["passkey"] for s in res.samples] == [passkey.make_passkey(7, 256, 0.25, t) for t in range(3)]
    assert all(s["predicted"] == s["passkey"] and s["tokens"] <= 256 for s in res.samples)

    class LastDigitWrong(StandIn):
        def get_decoder(self):
            decoder = self.decoder

            class D(nn.Module):
                def forward(self, input_ids, use_cache=False):
                    decoder.wrong_at = {input_ids.shape[1] - 2}  # the position predicting the last answer token
                    return decoder(input_ids)

            return D()

    res = passkey.evaluate_depth(LastDigitWrong(len(tokenizer)), tokenizer, 256, 0.25, 3, seed=7)
    assert res.correct == 0 and all(s["predicted"] != s["passkey"] for s in res.samples)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def torch_backend():
    with swkernels.force_backend("torch"):
        yield


def test_eval_model_dir_cli(model_dir, tmp_path, torch_backend):
    out = tmp_path / "reports" / "eval.json"
    r = invoke(str(model_dir), "--lengths", "128,256", "--passkey-depths", "0,1", "--passkey-trials", "1", "--json",
               "--out", str(out))
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    jsonschema.validate(report, SCHEMA)
    assert json.loads(out.read_text()) == report and not list(out.parent.glob(".*tmp*"))
    a, b = report["results"]
    assert (a["length"], b["length"]) == (128, 256)
    assert not a["beyond_max_positions"] and b["beyond_max_positions"]  # the model has 128 positions
    assert "length 256 exceeds the model's max_position_embeddings=128" in r.stderr
    assert a["passkey"] is None and "passkey prompt needs at least" in a["passkey_skipped"]  # 128 < the prompt
    assert [d["trials"] for d in b["passkey"]["depths"]] == [1, 1]
    assert a["perplexity"]["tokens"] == b["perplexity"]["tokens"] == report["data"]["scored_tokens"]
    assert report["data"]["format"] == "messages" and not report["data"]["all_tokens"]  # assistant turns only
    assert (a["perplexity"]["window"], a["perplexity"]["stride"]) == (128, 64)
    assert report["model"]["kept_on_transformers"] == []
    assert 100 < a["perplexity"]["ppl"] < 2000  # a random model: about the vocabulary size (508)

    table = invoke(str(model_dir), "--lengths", "128", "--passkey-trials", "0", "--stride", "100")
    assert table.exit_code == 0, table.stderr
    lines = table.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["length", "ppl"])
    row = lines[lines.index(header) + 1].split()
    assert row[0] == "128" and row[4] == "128/100"
    assert float(row[1]) == pytest.approx(a["perplexity"]["ppl"], rel=0.2)  # other windows, about the same


def test_eval_run_dir_uses_the_runs_rope_and_adapter(run_dir, model_dir, tokenizer, tmp_path, torch_backend):
    """A run directory: base + adapter with the recorded linear ×2 scaling; the number equals PEFT on
    transformers' model built with the same rope parameters (full logits)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from swengine.eval.runner import run_eval

    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(f"the grass is green and the sky number {i} is blue" for i in range(12)))
    report = run_eval(str(run_dir), [64], data=str(data), trials=0)
    jsonschema.validate(report, SCHEMA)
    m = report["model"]
    assert m["rope"]["rope_type"] == "linear" and m["rope"]["factor"] == 2.0
    assert m["rope_source"] == "run config context.rope_scaling"
    assert m["max_position_embeddings"] == 256 and m["adapter"] == str(run_dir / "adapter")
    assert Path(m["run_dir"]) == run_dir

    config = AutoConfig.from_pretrained(str(model_dir))
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir), config=config),
                                    str(run_dir / "adapter")).eval()
    ids = torch.tensor(token_stream(str(data), tokenizer).ids)
    want, count = hf_doc_nll(ref, ids, 64, 32)
    got = report["results"][0]["perplexity"]
    assert got["tokens"] == count and got["nll_sum"] == pytest.approx(want, rel=1e-5)

    # the same through MODEL --adapter RUN (the run's scaling found the same way); without the adapter it changes
    same = run_eval(str(model_dir), [64], adapter=str(run_dir), data=str(data), trials=0)
    assert same["model"]["rope_source"] == "run config context.rope_scaling"
    assert same["results"][0]["perplexity"]["nll_sum"] == pytest.approx(got["nll_sum"], rel=1e-6)
    base = run_eval(str(model_dir), [64], data=str(data), trials=0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert base["results"][0]["perplexity"]["nll_sum"] != pytest.approx(got["nll_sum"], rel=1e-3)


# ---------------------------------------------------------------- bad input


def test_parse_options():
    assert parse_lengths("2048, 4096,8k") == [2048, 4096, 8192]
    assert parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("0", "-5", "abc", "1.5", "", "2048,,4096"):
        with pytest.raises(UserError, match="--lengths"):
            parse_lengths(bad)
    for bad in ("1.5", "-0.1", "x", "nan"):
        with pytest.raises(UserError, match="--passkey-depths"):
            parse_depths(bad)


@pytest.fixture(scope="module")
def no_rope_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config

    out = tmp_path_factory.mktemp("gpt2")
    GPT2Config(n_embd=32, n_layer=1, n_head=2).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("args,message", [
    (["{missing}", "--lengths", "64"], "not found; pass a `swengine train` output directory"),
    (["{model}", "--lengths", "0,64"], "--lengths: '0' is not a positive integer"),
    (["{model}", "--lengths", "64,abc"], "--lengths: 'abc' is not a positive integer"),
    (["{model}", "--lengths", "64", "--rope-scaling", '{"rope_type": "warp", "factor": 2}'],
     "--rope-scaling: unknown rope type 'warp'"),
    (["{model}", "--lengths", "64", "--rope-scaling", "yarn"], "--rope-scaling is not valid JSON"),
    (["{no_rope}", "--lengths", "64"], "has no rotary position embedding (RoPE)"),
    (["{model}", "--lengths", "64", "--window", "32", "--stride", "40"], "--stride 40 exceeds the window of 32"),
    (["{model}", "--lengths", "64", "--data", "{missing}"], "--data"),
    (["{run}", "--lengths", "64", "--adapter", "{run}"], "--adapter goes with a MODEL directory"),
    (["{empty}", "--lengths", "64"], "is neither a model directory"),
    (["{model}", "--lengths", "64", "--out", "{empty}"], "is a directory; pass a file path"),
    (["{model}", "--lengths", "64", "--passkey-depths", "0,2"], "--passkey-depths: '2' is not a number in [0, 1]"),
])
def test_bad_input_exits_2_with_one_line(args, message, model_dir, run_dir, no_rope_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    paths = {"model": model_dir, "run": run_dir, "no_rope": no_rope_dir, "missing": tmp_path / "nope",
             "empty": tmp_path / "empty"}
    r = invoke(*[a.format(**paths) if a.startswith("{") and a.endswith("}") and a[1:-1] in paths else a
                 for a in args])
    assert r.exit_code == 2, r.stdout + r.stderr
    last = r.stderr.rstrip("\n").split("\n")[-1]  # after any progress lines: the error, on one line
    assert last.startswith("error: ") and message in last and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""


def test_bad_choice_is_a_usage_error(model_dir):
    r = invoke(str(model_dir), "--lengths", "64", "--device", "tpu")
    assert r.exit_code == 2 and "'tpu' is not one of" in r.stderr


def test_unknown_rope_type_in_the_run_is_one_line(run_dir, tmp_path):
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    (bad / "config.yaml").write_text(yaml.safe_dump({"context": {"rope_scaling": {"rope_type": "warp"}}}))
    r = invoke(str(bad), "--lengths", "64")
    assert r.exit_code == 2 and "run config context.rope_scaling: unknown rope type 'warp'" in r.stderr


def test_cli_module_imports_no_torch():
    """`swengine --help` stays fast: the command's module loads torch/transformers only when it runs."""
    import subprocess
    import sys

    code = ("import sys, swengine.eval.cli; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'swkernels')); print(heavy); sys.exit(bool(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
