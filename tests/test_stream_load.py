"""Streaming NF4 load (issue 19): a random Llama in 4 safetensors shards streams into NF4 equal to
the non-streaming path (from_pretrained + quantize_nf4_) with host RAM bounded by one shard;
a pre-quantised bitsandbytes checkpoint loads as it is and trains."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig  # noqa: E402

from swengine.model.load import from_pretrained_checked, load_model  # noqa: E402
from swengine.model.patch import resolve_targets  # noqa: E402
from swengine.model.quant import quantize_nf4_  # noqa: E402
from swengine.model.stream_load import StreamUnsupported, shard_files, stream_load_nf4  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
MiB = 2**20


def _write(directory: Path, config: LlamaConfig, shards: int) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size=math.ceil(size / shards * 1.03))
    assert len(shard_files(directory)) >= min(shards, 2)
    return directory


def _llama(**kw) -> LlamaConfig:
    base = dict(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """~39M-param random Llama (78 MB bf16; 37.7M of it in the 84 target linears) in 4 shards."""
    path = _write(tmp_path_factory.mktemp("llama40m"), _llama(), 4)
    assert len(shard_files(path)) == 4
    return path


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("tied"), _llama(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2,
                                                          tie_word_embeddings=True), 3)


def _old_path(path, dtype, double_quant=True, targets=("all-linear",)):
    """What load_model(load_in_4bit=True) did before streaming: the whole model in host RAM, then NF4."""
    model = from_pretrained_checked(str(path), config=AutoConfig.from_pretrained(path), dtype=dtype,
                                    attn_implementation="sdpa")
    quantize_nf4_(model, resolve_targets(model, targets), double_quant=double_quant, compute_dtype=dtype)
    return model


def _same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert dict(a.named_buffers()).keys() == dict(b.named_buffers()).keys()
    for (k, x), (_, y) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y), k


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("dtype,double_quant,targets", [
    (torch.float32, True, ("all-linear",)),
    (torch.bfloat16, False, ("q_proj", "v_proj", "down_proj")),
])
def test_stream_equals_non_streaming_nf4(sharded, monkeypatch, dtype, double_quant, targets):
    old = _old_path(sharded, dtype, double_quant, targets)
    # load_model streams: transformers' loader is never called
    import swengine.model.load as load_mod

    monkeypatch.setattr(load_mod, "from_pretrained_checked", lambda *a, **k: pytest.fail("did not stream"))
    new = load_model(str(sharded), AutoConfig.from_pretrained(sharded), dtype, torch.device("cpu"),
                     load_in_4bit=True, double_quant=double_quant, targets=targets)
    n4 = sum(type(m).__name__ == "Linear4bit" for m in new.modules())
    assert n4 == sum(type(m).__name__ == "Linear4bit" for m in old.modules()) == 12 * len(resolve_targets(new, targets))
    assert not new.training and type(new.model.layers[0].mlp.down_proj.weight).__name__ == "Params4bit"
    _same_state(new, old)
    ids = torch.randint(0, 1024, (2, 24))
    la, lb = _logits(new, ids), _logits(old, ids)
    assert la.dtype == lb.dtype and torch.equal(la, lb)


def test_tied_embeddings_and_rotary_buffers(tiny_tied, capsys):
    new = stream_load_nf4(tiny_tied, AutoConfig.from_pretrained(tiny_tied), torch.float32, "cpu")
    assert "Loading" in capsys.readouterr().err  # the progress bar, on stderr
    assert new.lm_head.weight is new.model.embed_tokens.weight
    assert not any(p.is_meta for p in new.parameters()) and not any(b.is_meta for b in new.buffers())
    old = _old_path(tiny_tied, torch.float32)
    _same_state(new, old)
    ids = torch.randint(0, 1024, (1, 16))
    assert torch.equal(_logits(new, ids), _logits(old, ids))


def test_unmappable_checkpoint_falls_back(tiny_tied, tmp_path):
    """A checkpoint key the model has no place for: the streaming loader refuses from the headers
    (before reading weights) and load_model takes transformers' path, which reports/ignores it."""
    from safetensors.torch import load_file, save_file

    for f in tiny_tied.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    first = shard_files(tmp_path)[0]
    tensors = load_file(first)
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, first, metadata={"format": "pt"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = first.name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(StreamUnsupported, match="model.extra.weight"):
        stream_load_nf4(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.float32, "cpu", progress=False)
    model = load_model(str(tmp_path), AutoConfig.from_pretrained(tmp_path), torch.float32, torch.device("cpu"),
                       load_in_4bit=True)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    torch.set_num_threads(1)
    import bitsandbytes, tqdm.auto, safetensors.torch  # noqa: F401  (imports are not the load)
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    from swengine.model.load import from_pretrained_checked
    from swengine.model.patch import resolve_targets
    from swengine.model.quant import quantize_nf4_
    from swengine.model.stream_load import stream_load_nf4

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    path, mode = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(path)
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:  # reset the high-water mark: the imports' transient peak is not the load's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = rss()
    t = time.perf_counter()
    if mode == "stream":
        model = stream_load_nf4(path, config, torch.bfloat16, "cpu", progress=False)
    else:
        model = from_pretrained_checked(path, config=config, dtype=torch.bfloat16, attn_implementation="sdpa")
        quantize_nf4_(model, resolve_targets(model, ("all-linear",)), compute_dtype=torch.bfloat16)
    seconds = time.perf_counter() - t
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = hwm() if reset else maxrss  # ru_maxrss never resets: it is the load's peak only when above base_peak
    print(json.dumps({"base": base, "base_peak": base_peak, "maxrss": maxrss, "peak": peak, "after": rss(),
                      "seconds": seconds}))
""")


def _measure(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), mode], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    if m["maxrss"] > m["base_peak"]:  # the load set the lifetime peak: both measures agree
        assert abs(m["maxrss"] - m["peak"]) <= 4 * MiB, m
    return m


def _sizes(path: Path) -> tuple[int, int, int]:
    """(largest shard, all shards, largest tensor) in bytes."""
    from safetensors import safe_open

    shards = [f.stat().st_size for f in shard_files(path)]
    tensor = 0
    for f in shard_files(path):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_slice(k)
                tensor = max(tensor, math.prod(t.get_shape()) * 2)  # bf16
    return max(shards), sum(shards), tensor


def _check_bound(path: Path, label: str) -> dict:
    """Peak RSS during the streaming load, above the process's RSS before it, stays below the
    largest shard (memory-mapped while it is read) + what the loaded model itself occupies (on the
    CPU device the NF4 model lives in host RAM; on a GPU it would not) + 3 × the largest tensor
    (in flight: its bf16 copy and bitsandbytes' fp32 working copy while quantising on the CPU) +
    16 MiB (code pages first touched by the load, ~10 MiB measured) + 10% of the checkpoint
    (allocator slack, which grows with what was allocated: 0.45B measured 563-589 MiB against 568 MiB
    without it). Far inside the issue's bound (largest shard + 1 GiB). What the
    load needs beyond the model it returns (all a GPU load needs from the host) stays well below
    the bf16 model, which the non-streaming path holds whole."""
    largest, total, tensor = _sizes(path)
    m = _measure(path, "stream")
    rise, resident = m["peak"] - m["base"], m["after"] - m["base"]
    print(f"{label} stream: peak rise {rise / MiB:.1f} MiB (resident model {resident / MiB:.1f} MiB), largest "
          f"shard {largest / MiB:.1f} MiB, bf16 checkpoint {total / MiB:.1f} MiB, {m['seconds']:.2f} s")
    assert resident < 0.5 * total  # NF4 linears + bf16 embeddings/head/norms (+ code pages)
    assert rise <= largest + resident + 3 * tensor + 16 * MiB + total // 10
    assert rise - resident <= largest + GiB  # the bound for the host (the model lives on the GPU there)
    assert rise - resident < 0.5 * total
    return m


def test_peak_host_rss_bounded_by_one_shard(sharded):
    _check_bound(sharded, "39M")


@pytest.mark.slow
def test_peak_host_rss_bigger_model_and_old_path(tmp_path):
    """~0.45B params (0.9 GB bf16) in 4 shards: the bound holds, and the old path's peak holds the
    whole bf16 model (the reference the streaming load improves on)."""
    path = _write(tmp_path, _llama(vocab_size=8192, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                                   num_attention_heads=16, num_key_value_heads=8), 4)
    new = _check_bound(path, "0.45B")
    old = _measure(path, "old")
    total = _sizes(path)[1]
    print(f"0.45B old: peak rise {(old['peak'] - old['base']) / MiB:.1f} MiB, {old['seconds']:.2f} s")
    assert old["peak"] - old["base"] >= total
    assert new["peak"] - new["base"] < 0.6 * (old["peak"] - old["base"])


# ---- pre-quantised bitsandbytes checkpoints ----

@pytest.fixture(scope="module")
def prequantised(tmp_path_factory, tiny_tied) -> Path:
    """A checkpoint saved by transformers from a load_in_4bit (NF4, double quant) model, in 3 shards
    so a packed weight and its quant-state tensors may sit in different shards."""
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
    untied = _write(tmp_path_factory.mktemp("untied"), _llama(hidden_size=128, intermediate_size=256,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              num_key_value_heads=2), 2)
    model = AutoModelForCausalLM.from_pretrained(untied, quantization_config=qc, dtype=torch.float32)
    out = tmp_path_factory.mktemp("prequant")
    model.save_pretrained(out, max_shard_size="200KB")
    assert len(shard_files(out)) >= 3
    assert AutoConfig.from_pretrained(out).quantization_config["load_in_4bit"]
    return out


def _train_mode_nf4(model):
    for m in model.modules():  # keep bitsandbytes' CPU eval-mode repack out of the comparison
        if type(m).__name__ == "Linear4bit":
            m.train()
    return model


def test_prequantised_loads_as_is(prequantised):
    from safetensors import safe_open

    new = stream_load_nf4(prequantised, AutoConfig.from_pretrained(prequantised), torch.float32, "cpu",
                          progress=False)
    ref = _train_mode_nf4(AutoModelForCausalLM.from_pretrained(prequantised, dtype=torch.float32))
    q = new.model.layers[1].mlp.gate_proj
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_state.nested
    files = {k: f for f in shard_files(prequantised) for k in safe_open(str(f), "pt").keys()}
    key = "model.layers.1.mlp.gate_proj.weight"
    with safe_open(str(files[key]), "pt") as sf:
        assert torch.equal(q.weight.data, sf.get_tensor(key))  # packed bytes as stored: no re-quantisation
    _same_state(new, ref)
    ids = torch.randint(0, 1024, (2, 16))
    assert torch.equal(_logits(new, ids), _logits(ref, ids))


def test_prequantised_trains_with_our_nf4_kernel(prequantised):
    import swkernels
    from swengine.model.build import build_training_model
    from swengine.model.patch import LoraSpec

    config = AutoConfig.from_pretrained(prequantised)
    config.use_cache = False
    packed = None
    with swkernels.force_backend("torch"):
        tm = build_training_model(config, LoraSpec(rank=4, alpha=8), dtype=torch.float32, device="cpu",
                                  weights=str(prequantised), quant="nf4")
        bases = [m for m in tm.model.modules() if type(m).__name__ == "Linear4bit"]
        assert len(bases) == 2 * 7 and tm.handle is not None and len(tm.handle.lora) == 2 * 7
        packed = bases[0].weight.data.clone()
        ids = torch.randint(0, 1024, (2, 16))
        out = tm.model(input_ids=ids, labels=ids)
        assert torch.isfinite(out.loss)
        out.loss.backward()
    grads = [p.grad for p in tm.params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert torch.equal(bases[0].weight.data, packed)


def test_demo_model_streams_equal():
    """The embedded demo model (what `swengine train` QLoRA runs load by default) streams equal."""
    from swengine.model.load import DEMO_MODEL

    if not shard_files(DEMO_MODEL):
        pytest.skip("the demo model has no safetensors weights")
    config = AutoConfig.from_pretrained(DEMO_MODEL)
    new = stream_load_nf4(DEMO_MODEL, config, torch.float32, "cpu", progress=False)
    old = _old_path(DEMO_MODEL, torch.float32)
    _same_state(new, old)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    assert torch.equal(_logits(new, ids), _logits(old, ids))
