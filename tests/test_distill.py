"""Distillation (issue 17): the frozen teacher, the vocabulary check, the fused step loss and its
telemetry parts, distillation beating SFT on KL to the teacher, the offline top-k cache (equal to
online at k = vocabulary size, bounded at small k, resumable with identical shards, refusing
mismatched data/tokenizer/settings and corrupt shards), and the `distill-cache` command.

The teacher is the embedded demo model (trained, 6 layers, hidden 128, 508 tokens); the student a
smaller Llama (2 layers, hidden 32, LM head padded to 512 rows), pre-trained for a few steps in
the test so that it is not random."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch
import typer
from typer.testing import CliRunner

import swkernels
from swengine.config import DataConfig
from swengine.data.batches import BatchStream, collate
from swengine.data.dataset import prepare
from swengine.distill.cache import (
    batch_rows,
    build_cache,
    data_identity,
    distill_cache,
    open_cache,
    shard_name,
)
from swengine.distill.cli import distill_cache_command
from swengine.distill.loss import decoder_hidden, distill_step_loss, shifted_labels
from swengine.distill.teacher import check_vocab, load_teacher, tokenizer_hash
from swengine.errors import UserError
from swengine.model.build import build_training_model
from swengine.model.load import DEMO_MODEL, load_tokenizer
from swengine.model.patch import LoraSpec
from swengine.train.step import causal_lm_loss, label_tokens
from tests.utils import pretrain

SCHEMA = json.loads((Path(__file__).parents[1] / "specs" / "distill_cache.schema.json").read_text())
V = 508  # the demo tokenizer's vocabulary; the student's head has 512 rows (padding)
SEQ = 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread_torch_backend():
    """One intra-op thread (tiny models; a busy 2-core box) and the torch fallbacks, not the
    Triton interpreter: the loop and the cache are under test here, the kernels have their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with swkernels.force_backend("torch"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(DEMO_MODEL))


@pytest.fixture(scope="module")
def data_cfg(tiny_train_data):
    return DataConfig(train=str(tiny_train_data), max_seq_len=SEQ)


@pytest.fixture(scope="module")
def rows(data_cfg, tok):
    return prepare(data_cfg, tok, data_cfg.train, "", 0).train


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(str(DEMO_MODEL), dtype=torch.float32, device="cpu")


def student_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=512, max_position_embeddings=256, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, rows, tok):
    """The student base: random, then 60 full-parameter Adam steps of plain CE on the data."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(student_config())
    pretrain(model, rows, tok.pad_token_id)
    path = tmp_path_factory.mktemp("student") / "student"
    model.save_pretrained(path)
    return path


def student(student_dir, seed: int = 0, lora_noise: float = 0.0):
    torch.manual_seed(seed)
    built = build_training_model(None, LoraSpec(rank=8, alpha=16), dtype=torch.float32, device="cpu",
                                 weights=str(student_dir))
    if lora_noise:  # B = 0 makes the adapters a no-op; perturb them to test a non-trivial student
        for p in built.params:
            p.data.normal_(0, lora_noise)
    return built


@pytest.fixture(scope="module")
def batch(rows, tok):
    stream = BatchStream(rows, 4, 0, tok.pad_token_id)
    b = stream.next()
    return b, batch_rows(stream)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, data_cfg):
    """distill-cache directories by (k, logprobs dtype), built once."""
    root = tmp_path_factory.mktemp("caches")
    made = {}

    def get(k: int, dtype: str = "fp16") -> Path:
        if (k, dtype) not in made:
            out = root / f"k{k}-{dtype}"
            distill_cache(out, teacher=str(DEMO_MODEL), data_cfg=data_cfg, seed=0, top_k=k, batch_size=4,
                          device="cpu", logprobs_dtype=dtype, log=lambda m: None)
            made[k, dtype] = out
        return made[k, dtype]

    return get


def reference_parts(student_model, teacher, b, kind, temperature, beta=0.5):
    """Per-token CE and KD with full logits in plain torch (the oracle), over the real vocabulary."""
    labels = shifted_labels(b)
    mask = labels != -100
    with torch.no_grad():
        s = (decoder_hidden(student_model, b)[mask] @ student_model.lm_head.weight.t())[:, :V]
        t = (decoder_hidden(teacher, b)[mask] @ teacher.lm_head.weight.t())[:, :V]
    ce = torch.nn.functional.cross_entropy(s, labels[mask], reduction="sum")
    ls, lt = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    if kind == "forward_kl":
        kd = (lt.exp() * (lt - ls)).sum()
    elif kind == "reverse_kl":
        kd = (ls.exp() * (ls - lt)).sum()
    else:
        m = (beta * lt.exp() + (1 - beta) * ls.exp()).log()
        kd = beta * (lt.exp() * (lt - m)).sum() + (1 - beta) * (ls.exp() * (ls - m)).sum()
    return ce, kd, int(mask.sum())


def kl_to_teacher(model, teacher, rows, pad_id) -> float:
    """Mean forward KL(teacher ‖ student) at T = 1 over every loss position of the data."""
    b = collate(rows, pad_id)
    labels = shifted_labels(b)
    mask = labels != -100
    with torch.no_grad():
        s = (decoder_hidden(model, b)[mask] @ model.lm_head.weight.t())[:, :V].log_softmax(-1)
        t = (decoder_hidden(teacher, b)[mask] @ teacher.lm_head.weight.t())[:, :V].log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- teacher and vocabulary


def test_teacher_is_frozen_patched_and_matches_transformers(teacher, batch):
    from transformers import AutoModelForCausalLM

    from swengine.model.fused_attention import FusedAttention

    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(isinstance(m, FusedAttention) for m in teacher.modules())
    ids = batch[0]["input_ids"][:, :48]  # one sequence per row (packed rows: ours keeps documents apart)
    hf = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = teacher(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def swapped_tokenizer(tmp_path, tok):
    """The demo tokenizer with the ids of two tokens exchanged: same size, another vocabulary."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return AutoTokenizer.from_pretrained(tmp_path)


def test_check_vocab_padding_ok_real_mismatch_one_line(tmp_path, tok):
    assert check_vocab(tok, tok, 508, 508) == V
    assert check_vocab(tok, tok, 512, 508) == V  # a padded head (as 151,936 vs 152,064 rows)
    assert check_vocab(tok, tok, 508, 640) == V
    with pytest.raises(UserError) as exc:
        check_vocab(tok, tok, 500, 508)
    assert "LM head has 500 rows" in one_line(exc)
    other = swapped_tokenizer(tmp_path / "swapped", tok)
    assert len(other) == len(tok)
    with pytest.raises(UserError) as exc:
        check_vocab(tok, other, 512, 508)
    assert "another tokenizer" in one_line(exc) and "2 ids differ" in str(exc.value)
    assert tokenizer_hash(other) != tokenizer_hash(tok)
    tok_added = load_tokenizer(str(DEMO_MODEL))
    tok_added.add_tokens(["<extra_token>"])
    with pytest.raises(UserError):
        check_vocab(tok, tok_added, 512, 512)


# ---------------------------------------------------------------- the step loss


@pytest.mark.parametrize("kind,temperature,alpha", [("forward_kl", 1.0, 0.5), ("reverse_kl", 2.0, 0.3),
                                                    ("jsd", 1.5, 0.8)])
def test_step_loss_and_parts_match_full_logits(student_dir, teacher, batch, kind, temperature, alpha):
    st = student(student_dir, lora_noise=0.05)
    b, _ = batch
    n = label_tokens(b)
    loss, ce, kd = distill_step_loss(st.model, teacher, b, kind=kind, temperature=temperature, alpha=alpha,
                                     beta=0.5, num_items=n, vocab_size=V)
    ce_ref, kd_ref, count = reference_parts(st.model, teacher, b, kind, temperature)
    assert count == n
    torch.testing.assert_close(ce, ce_ref / n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, kd_ref / n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), (1 - alpha) * ce + alpha * kd, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in st.params)
    assert all(p.grad is None for p in teacher.parameters())
    # without num_items: the mean over this micro-batch's label tokens
    mean, _, _ = distill_step_loss(st.model, teacher, b, kind=kind, temperature=temperature, alpha=alpha,
                                   num_items=None, vocab_size=V, parts=False)
    torch.testing.assert_close(mean.detach(), loss.detach(), rtol=1e-5, atol=1e-6)


def test_token_weighted_accumulation_equals_one_big_batch(student_dir, teacher, rows, tok):
    """Two micro-batches with num_items = the step's label tokens add up to the big batch's mean,
    as causal_lm_loss does; alpha = 0 is exactly the fused CE over the real vocabulary."""
    st = student(student_dir, lora_noise=0.05)
    big = collate(rows[:4], tok.pad_token_id)
    halves = [collate(rows[:2], tok.pad_token_id), collate(rows[2:4], tok.pad_token_id)]
    n = label_tokens(big)
    assert n == sum(label_tokens(h) for h in halves)
    kw = dict(kind="forward_kl", temperature=2.0, alpha=0.5, vocab_size=V)
    whole, ce_w, kd_w = distill_step_loss(st.model, teacher, big, num_items=None, **kw)
    parts = [distill_step_loss(st.model, teacher, h, num_items=n, **kw) for h in halves]
    torch.testing.assert_close(sum(p[0] for p in parts).detach(), whole.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(p[1] for p in parts), ce_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(p[2] for p in parts), kd_w, rtol=1e-5, atol=1e-6)
    st_same = build_training_model(student_config(), LoraSpec(rank=8), dtype=torch.float32, device="cpu")
    head = st_same.model.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach()[:V].clone(), requires_grad=False)  # an unpadded head
    sft = causal_lm_loss(st_same.model, big, fused=True, num_items=n)
    ce_only, ce_part, kd_part = distill_step_loss(st_same.model, teacher, big, num_items=n, kind="forward_kl",
                                                  alpha=0.0, vocab_size=V)
    torch.testing.assert_close(ce_only.detach(), sft.detach(), rtol=1e-5, atol=1e-6)
    assert float(kd_part) == 0.0 and torch.equal(ce_part, ce_only.detach())


def test_distillation_beats_sft_on_kl_to_the_teacher(student_dir, teacher, rows, tok):
    """(a) Same student init, same batches, 30 AdamW steps on the LoRA adapters: distillation
    (forward KL, alpha 0.5, T 1) ends much closer to the teacher than plain SFT."""
    kl = {}
    for mode in ("sft", "distill"):
        st = student(student_dir)
        opt = torch.optim.AdamW(st.params, lr=1e-2)
        stream = BatchStream(rows, 4, 0, tok.pad_token_id)
        if mode == "sft":
            kl["init"] = kl_to_teacher(st.model, teacher, rows, tok.pad_token_id)
        for _ in range(30):
            b = stream.next()
            n = label_tokens(b)
            if mode == "sft":
                loss = causal_lm_loss(st.model, b, fused=True, num_items=n)
            else:
                loss, _, _ = distill_step_loss(st.model, teacher, b, kind="forward_kl", temperature=1.0, alpha=0.5,
                                               num_items=n, vocab_size=V, parts=False)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        kl[mode] = kl_to_teacher(st.model, teacher, rows, tok.pad_token_id)
    print(f"KL(teacher || student): init {kl['init']:.3f}, after SFT {kl['sft']:.3f}, after distillation "
          f"{kl['distill']:.3f}")
    assert kl["distill"] < kl["init"] - 0.3
    assert kl["distill"] < 0.85 * kl["sft"], kl


# ---------------------------------------------------------------- the offline cache


def test_offline_cache_equals_online_at_full_k_and_is_bounded_at_small_k(student_dir, teacher, batch, cache_dir,
                                                                         tok, data_cfg, rows):
    """(b) k = vocabulary size: the same loss and gradients as the online teacher (fp32 log-probs:
    to float rounding; fp16: 1e-5 relative). Small k: KD over the renormalised top k, a bounded
    difference that shrinks as k grows, with gradients pointing the same way."""
    st = student(student_dir, lora_noise=0.05)
    b, idx = batch
    n = label_tokens(b)

    def run(teacher_model=None, topk=None, kind="forward_kl", temperature=1.0):
        loss, ce, kd = distill_step_loss(st.model, teacher_model, b, kind=kind, temperature=temperature, alpha=0.5,
                                         num_items=n, topk=topk, vocab_size=V)
        grads = torch.autograd.grad(loss, st.params)
        return loss.detach(), ce, kd, torch.cat([g.flatten() for g in grads])

    def cached(k, dtype="fp16"):
        cache = open_cache(cache_dir(k, dtype), tok, data_cfg.train, data_cfg, seed=0, rows=rows)
        assert cache.vocab_size == V
        return cache.batch_topk(idx, b["input_ids"].shape[1])

    for kind, temperature in (("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 1.0)):
        online = run(teacher, kind=kind, temperature=temperature)
        exact = run(topk=cached(V, "fp32"), kind=kind, temperature=temperature)
        for a, e in zip(online, exact, strict=True):
            torch.testing.assert_close(e, a, rtol=2e-5, atol=1e-6)
        half = run(topk=cached(V, "fp16"), kind=kind, temperature=temperature)
        torch.testing.assert_close(half[0], online[0], rtol=1e-4, atol=0)
    online = run(teacher)
    report = []
    for k in (4, 16, 64):
        loss, ce, kd, grad = run(topk=cached(k))
        torch.testing.assert_close(ce, online[1], rtol=1e-5, atol=1e-6)  # CE does not depend on the teacher
        rel = float((loss - online[0]).abs() / online[0])
        cos = float(torch.nn.functional.cosine_similarity(grad, online[3], dim=0))
        report.append((k, rel, cos))
    print("top-k vs online (k, relative loss difference, gradient cosine):", report)
    rels = [r for _, r, _ in report]
    assert rels == sorted(rels, reverse=True), report  # closer as k grows
    coss = [c for _, _, c in report]
    assert rels[-1] < 0.15 and coss[-1] > 0.85 and min(coss) > 0.7, report
    # the stored distribution: top-k probabilities + tail mass = 1; no tail at k = V
    pos, lp, _, tail = open_cache(cache_dir(16), tok, data_cfg.train, data_cfg, seed=0).row(0)
    torch.testing.assert_close(lp.exp().sum(-1) + tail, torch.ones_like(tail), rtol=0, atol=2e-3)
    assert bool((lp[:, :-1] >= lp[:, 1:]).all())
    assert float(open_cache(cache_dir(V, "fp32"), tok, data_cfg.train, data_cfg, seed=0).row(0)[3].abs().max()) == 0


def test_manifest_matches_schema_and_rows(cache_dir, rows, data_cfg):
    manifest = json.loads((cache_dir(16) / "manifest.json").read_text())
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["complete"] and manifest["rows"] == len(rows) and manifest["vocab_size"] == V
    loss_positions = sum(sum(1 for t in range(len(r.labels) - 1) if r.labels[t + 1] != -100) for r in rows)
    assert manifest["cached_tokens"] == loss_positions
    assert manifest["data"] == data_identity(data_cfg, data_cfg.train, "", 0)


def test_batch_rows_names_the_rows_of_each_batch(rows, tok):
    stream = BatchStream(rows, 3, 5, tok.pad_token_id)
    for _ in range(2 * stream.batches_per_epoch + 1):  # across epoch ends, including a short last batch
        b = stream.next()
        idx = batch_rows(stream)
        assert torch.equal(b["input_ids"], collate([rows[i] for i in idx], tok.pad_token_id)["input_ids"])


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.safetensors"))}


class Stop(Exception):
    pass


def test_interrupted_cache_resumes_to_identical_shards(tmp_path, teacher, rows, tok, data_cfg):
    """(c) An interruption between shards, then a rerun: the finished shards are kept (verified),
    the rest computed, and every shard equals an uninterrupted run's byte for byte; a corrupted
    shard is recomputed on the next run."""
    data = data_identity(data_cfg, data_cfg.train, "", 0)
    kw = dict(teacher=teacher, teacher_info={"id": "demo", "quant": "none", "dtype": "fp32"}, tokenizer=tok,
              data=data, top_k=8, batch_size=2, shard_rows=2, log=lambda m: None)
    clean = build_cache(tmp_path / "clean", rows, **kw)
    assert clean.computed == -(-len(rows) // 2) >= 3
    out = tmp_path / "resumed"

    def stop_after_first(index):
        if index == 0:
            raise Stop

    with pytest.raises(Stop):
        build_cache(out, rows, after_shard=stop_after_first, **kw)
    manifest = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(manifest, SCHEMA)
    assert not manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0]
    with pytest.raises(UserError) as exc:
        open_cache(out, tok, data_cfg.train, data_cfg, seed=0)
    assert "incomplete (1 of 4 shards)" in one_line(exc) and "rerun" in str(exc.value)
    again = build_cache(out, rows, **kw)
    assert (again.kept, again.computed) == (1, clean.computed - 1)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert again.manifest["shards"] == clean.manifest["shards"]
    # a flipped byte: the rerun notices and recomputes that shard only
    victim = out / shard_name(2)
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    notes = []
    fixed = build_cache(out, rows, **{**kw, "log": notes.append})
    assert (fixed.kept, fixed.computed) == (clean.computed - 1, 1)
    assert any("fails its checksum" in n for n in notes)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert not list(out.glob(".tmp-*"))


KILLED = """
import sys, time, torch
torch.set_num_threads(1)
from swengine.config import DataConfig
from swengine.distill.cache import distill_cache
from swengine.model.load import DEMO_MODEL
cfg = DataConfig(train=sys.argv[2], max_seq_len=128)
distill_cache(sys.argv[1], teacher=str(DEMO_MODEL), data_cfg=cfg, seed=0, top_k=8, batch_size=2, device="cpu",
              shard_rows=2, after_shard=lambda i: time.sleep(float(sys.argv[3])))
"""


@pytest.mark.slow
def test_distill_cache_killed_with_sigkill_resumes_identically(tmp_path, data_cfg):
    """(c) The real thing: a process killed with SIGKILL once its first shard is listed, then the
    same build again: byte-identical shards to an uninterrupted run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    clean, out = tmp_path / "clean", tmp_path / "killed"
    subprocess.run([sys.executable, "-c", KILLED, str(clean), data_cfg.train, "0"], env=env, check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(out), data_cfg.train, "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if json.loads((out / "manifest.json").read_text())["shards"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 1 <= len(manifest["shards"]) < manifest["shards_total"]
    subprocess.run([sys.executable, "-c", KILLED, str(out), data_cfg.train, "0"], env=env, check=True,
                   capture_output=True, timeout=300)
    assert shard_bytes(out) == shard_bytes(clean) and len(shard_bytes(out)) == manifest["shards_total"]
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_cache_refuses_other_data_tokenizer_settings_and_corruption(tmp_path, cache_dir, tok, data_cfg, rows,
                                                                    tiny_train_data):
    """(d) Each mismatch is one line naming what differs and how to fix it."""
    import dataclasses
    import shutil

    good = cache_dir(16)
    open_cache(good, tok, data_cfg.train, data_cfg, seed=0, rows=rows)

    def refused(directory=good, tokenizer=tok, path=data_cfg.train, cfg=data_cfg, seed=0, rows_=None) -> str:
        with pytest.raises(UserError) as exc:
            open_cache(directory, tokenizer, path, cfg, seed=seed, rows=rows_)
        return one_line(exc)

    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(Path(tiny_train_data).read_text().splitlines()[:40]) + "\n")
    assert "cache built for another data file" in refused(path=str(other))
    assert "tokenizer differs" in refused(tokenizer=swapped_tokenizer(tmp_path / "swapped", tok))
    msg = refused(cfg=dataclasses.replace(data_cfg, max_seq_len=256))
    assert "data.max_seq_len=128, this run has data.max_seq_len=256" in msg
    assert "seed=0, this run has seed=3" in refused(seed=3)
    assert "packing" in refused(cfg=dataclasses.replace(data_cfg, packing=False))
    assert "training row 1 differs" in refused(rows_=[rows[0], rows[2], *rows[2:]])
    assert f"holds {len(rows)} training rows, this run prepares {len(rows) - 1}" in refused(rows_=rows[:-1])
    assert "not a directory" in refused(directory=tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    raw = bytearray((broken / shard_name(0)).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (broken / shard_name(0)).write_bytes(bytes(raw))
    assert "corrupt shard 0 (shard-00000.safetensors: checksum)" in refused(directory=broken)
    (broken / shard_name(0)).unlink()
    assert "shard 0 (shard-00000.safetensors) is missing" in refused(directory=broken)


# ---------------------------------------------------------------- the command


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("distill-cache")(distill_cache_command)
    app.command("x")(lambda: None)
    return app


def test_distill_cache_command(tmp_path, tiny_train_data, tok):
    runner = CliRunner()
    out = tmp_path / "cache"
    base = ["distill-cache", "--teacher", str(DEMO_MODEL), "--data", str(tiny_train_data), "--max-seq-len", "128",
            "--top-k", "8", "--device", "cpu", "--out", str(out)]
    result = runner.invoke(cli_app(), base)
    assert result.exit_code == 0, result.output
    assert f"train with distill.cache={out}" in result.stdout and "computed, 0 kept" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(manifest, SCHEMA)
    cfg = DataConfig(train=str(tiny_train_data), max_seq_len=128)
    open_cache(out, tok, cfg.train, cfg, seed=0, rows=prepare(cfg, tok, cfg.train, "", 0).train)
    again = runner.invoke(cli_app(), base)  # a finished cache: verified, nothing computed
    assert again.exit_code == 0 and f"(0 computed, {manifest['shards_total']} kept)" in again.stdout
    # the config's data settings are the cache's: data.packing=false makes other rows
    changed = runner.invoke(cli_app(), [*base, "data.packing=false"])
    assert isinstance(changed.exception, UserError)
    assert "holds a distill cache built with other settings" in str(changed.exception)
    assert "--overwrite" in str(changed.exception)
    replaced = runner.invoke(cli_app(), [*base, "data.packing=false", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "manifest.json").read_text())["data"]["settings"]["packing"] is False
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    refused = runner.invoke(cli_app(), [*base[:-1], str(foreign), "--overwrite"])
    assert isinstance(refused.exception, UserError) and "holds no distill cache" in str(refused.exception)
    assert (foreign / "keep.txt").read_text() == "mine"
    for args, words in ((["--top-k", "0"], "--top-k must be >= 1"), (["--top-k", "999"], "--top-k must be in 1..508"),
                        (["seed=0", "stray"], "unexpected argument 'stray'")):
        bad = runner.invoke(cli_app(), [*base, *args])
        assert isinstance(bad.exception, UserError) and words in str(bad.exception), bad.output


def test_cli_module_imports_no_torch():
    code = "import sys, swengine.distill.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
