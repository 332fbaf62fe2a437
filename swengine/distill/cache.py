"""The offline teacher: each training token's top-k teacher log-probs, precomputed once
(`swengine distill-cache`), so that training (``distill.cache=DIR``) never loads the teacher.

What is cached. The training rows exactly as `swengine train` makes them:
:func:`swengine.data.dataset.prepare` with the run's ``data.*`` settings, seed and tokenizer (same
records, eval split, shuffle, truncation and packing, hence the same row list). A training row is
identified by its index in that list (:attr:`Prepared.train`) and checked by the hash of its
content (input ids, labels, position ids). For each row, every position t whose next token
carries a loss (``labels[t + 1] != -100``: the positions the loss scores) stores:

* ``logprobs`` (k): the teacher's top-k log-probabilities at temperature 1 (raw log-softmax over
  the shared vocabulary, sorted descending; fp16 by default, fp32 with ``logprobs_dtype``);
* ``indices`` (k, int32): their token ids;
* ``tail_mass``: the probability outside the top k (1 − Σ top-k, computed from the logits beyond
  the top k, so exact when small; 0 at k = vocabulary size).
The training temperature is applied at training time: the loss renormalises softmax(logprobs/T)
over the k tokens (:func:`swkernels.fused_linear_distill`, top-k path), which at k = vocabulary
size is exactly softmax(logits/T).

On disk (``DIR``): ``shard-NNNNN.safetensors``, each holding ``shard_rows`` consecutive rows
(tensors ``logprobs`` (N, k), ``indices`` (N, k), ``tail_mass`` (N,), ``positions`` (N,) int32,
``row_offsets`` (rows + 1,) int64 into the N cached positions, ``row_hash`` (rows, 16) uint8), and
``manifest.json`` (specs/distill_cache.schema.json): the teacher, the tokenizer's vocabulary hash,
the data file's sha256 and the data settings, k, and the finished shards with sha256 checksums.

Crash safety. Each shard is written to ``.tmp-…``, fsynced and renamed; the manifest is rewritten
the same way after each shard, so a shard is listed only once it is complete. A rerun of the same
command (kill -9 included) verifies the listed shards, keeps those that pass and computes the
rest: the finished cache is byte-for-byte the one an uninterrupted run writes (same machine,
settings and batch size). A directory holding a cache of other settings is refused unless
``--overwrite``; a non-empty directory that holds no cache is always refused.

Reading: :func:`open_cache` checks the manifest against this run's data file, tokenizer, data
settings and rows (one-line :class:`UserError` saying which differs and how to fix it) and every
shard's checksum; :meth:`Cache.batch_topk` gives a micro-batch's (logprobs, indices) for
:func:`swengine.distill.loss.distill_step_loss`; :func:`batch_rows` says which rows a
:class:`BatchStream` batch holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from swengine.errors import UserError

SCHEMA_VERSION = 1
KIND = "swengine-distill-cache"
MANIFEST = "manifest.json"
SHARD_BYTES = 256 << 20  # target shard size: resumable granularity vs file count
LOGPROB_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
DATA_KEYS = ("format", "text_field", "max_seq_len", "packing", "train_on_prompt", "shuffle", "truncate")
HOW_TO_BUILD = "swengine distill-cache [CONFIG] --teacher MODEL --out DIR (same data.* settings and seed as training)"


# ---------------------------------------------------------------- identity


def file_sha256(path: str | Path) -> str:
    from swengine.train.checkpoint import sha256_file

    return sha256_file(Path(path))


def data_digest(data_cfg, data_path: str) -> str:
    """The training data's content digest: a single file's sha256; for a directory, a datasets
    source (save_to_disk, Hub) or a data.mix, a sha256 over each source's content fingerprint
    (the one the tokenised cache is keyed by) and its settings and weight."""
    if not data_cfg.mix and Path(data_path).is_file():
        return file_sha256(data_path)
    from swengine.data.sources import open_source, training_specs

    weights = [m.weight for m in data_cfg.mix] or [1.0]
    h = hashlib.sha256()
    for spec, weight in zip(training_specs(data_cfg, data_path), weights, strict=True):
        h.update(f"{open_source(spec).fingerprint}|{spec}|{weight}\n".encode())
    return h.hexdigest()


def data_identity(data_cfg, data_path: str, eval_path: str, seed: int) -> dict:
    """What decides the training rows besides the tokenizer: the training data's content
    (:func:`data_digest`), the data settings, the seed, and how the eval split is made (a separate
    eval file, or eval_fraction of the training records)."""
    settings = {key: getattr(data_cfg, key) for key in DATA_KEYS}
    settings["eval_split"] = "file" if eval_path else float(data_cfg.eval_fraction)
    path = "data.mix" if data_cfg.mix else str(data_path)
    return {"path": path, "sha256": data_digest(data_cfg, data_path), "seed": int(seed), "settings": settings}


def row_hash(row) -> bytes:
    """16 bytes of sha256 over a row's input ids, labels and position ids (int64)."""
    h = hashlib.sha256()
    for values in (row.input_ids, row.labels, row.position_ids):
        h.update(torch.tensor(values, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.digest()[:16]


def cached_positions(row) -> list[int]:
    """Positions t whose next token carries a loss (the positions the shifted loss scores)."""
    labels = row.labels
    return [t for t in range(len(labels) - 1) if labels[t + 1] != -100]


def default_shard_rows(max_seq_len: int, top_k: int, logprobs_dtype: str) -> int:
    per_token = top_k * (LOGPROB_DTYPES[logprobs_dtype].itemsize + 4) + 8
    return max(1, SHARD_BYTES // (max_seq_len * per_token))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ---------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    from swengine.train.checkpoint import _fsync_dir as fsync_dir

    fsync_dir(path)


def atomic_file(final: Path, write: Callable[[Path], None]) -> None:
    """Write ``final`` through ``.tmp-NAME-PID`` + fsync + rename + directory fsync: complete or absent."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def write_manifest(directory: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_file(directory / MANIFEST, lambda p: p.write_text(text, encoding="utf-8"))


def read_manifest(directory: Path) -> dict | None:
    """The manifest, None when there is none; a UserError when it is not one of ours."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); rebuild the cache: {HOW_TO_BUILD} --overwrite") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise UserError(f"{path} is not a distill-cache manifest; point at a directory written by swengine "
                        "distill-cache")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{directory} is a distill cache of schema_version {manifest.get('schema_version')}, this "
                        f"swengine reads {SCHEMA_VERSION}; rebuild it: {HOW_TO_BUILD} --overwrite")
    return manifest


def _shard_ok(directory: Path, entry: dict) -> bool:
    path = directory / entry["file"]
    return (path.is_file() and path.stat().st_size == entry["bytes"]
            and file_sha256(path) == entry["sha256"])


# ---------------------------------------------------------------- building


def _identity_keys(manifest: dict) -> dict:
    """The fields that must agree for a rerun to continue a cache."""
    return {key: manifest[key] for key in ("teacher", "tokenizer_sha256", "vocab_size", "data", "rows", "top_k",
                                           "logprobs_dtype", "shard_rows", "shards_total")}


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')} {json.dumps(old)} vs {json.dumps(new)}"


def _check_out(out: Path) -> None:
    """Refuse a file, or a non-empty directory that holds no cache (before anything is written)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and not (out / MANIFEST).is_file():
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith((".tmp-", ".swengine.lock")))
        if foreign:
            raise UserError(f"--out {out} is not empty and holds no distill cache ({foreign[0]}, ...); choose a new "
                            "or empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {out}: {exc.strerror or exc}; choose another directory") from None


def _previous(out: Path, identity: dict, overwrite: bool, log) -> dict | None:
    """The manifest to continue from (None: start fresh). Called holding the directory's lock."""
    manifest = read_manifest(out)
    if manifest is None:
        return None
    if overwrite:
        log(f"--overwrite: replacing the distill cache in {out}")
        for p in out.iterdir():
            if p.name == MANIFEST or (p.name.startswith("shard-") and p.name.endswith(".safetensors")):
                p.unlink()
        return None
    if _identity_keys(manifest) != identity:
        raise UserError(f"--out {out} holds a distill cache built with other settings "
                        f"({_first_difference(_identity_keys(manifest), identity)}); pass --overwrite to replace it "
                        "or choose another --out")
    return manifest


@dataclass
class BuildResult:
    manifest: dict
    computed: int  # shards computed by this call
    kept: int  # shards of an earlier run that verified and were kept


def build_cache(out: str | Path, rows: Sequence, *, teacher: torch.nn.Module | Callable[[], torch.nn.Module],
                teacher_info: dict, tokenizer, data: dict, top_k: int = 64, batch_size: int = 8,
                device: str | torch.device = "cpu", logprobs_dtype: str = "fp16", shard_rows: int | None = None,
                vocab_size: int | None = None, overwrite: bool = False, log: Callable[[str], None] = print,
                after_shard: Callable[[int], None] | None = None) -> BuildResult:
    """Write (or finish) the cache for ``rows`` (the prepared training rows) in ``out``.

    ``teacher``: the loaded teacher (:func:`swengine.distill.teacher.load_teacher`) or a callable
    loading it, called only when a shard is left to compute. ``teacher_info``: what the manifest
    records of it (``id``, ``quant``, ``dtype``). ``data``: :func:`data_identity`. ``vocab_size``:
    the shared vocabulary (default: the tokenizer's). ``after_shard(i)`` runs after shard i is
    durable (tests inject failures there)."""
    from swengine.distill.teacher import tokenizer_hash
    from swengine.distill.teacher import vocab_size as tokenizer_vocab
    from swengine.train.checkpoint import clean_debris
    from swengine.train.lock import RunLock

    out = Path(out)
    if logprobs_dtype not in LOGPROB_DTYPES:
        raise UserError(f"logprobs dtype must be one of {', '.join(LOGPROB_DTYPES)} (got {logprobs_dtype!r})")
    vocab = vocab_size or tokenizer_vocab(tokenizer)
    if not 1 <= top_k <= vocab:
        raise UserError(f"--top-k must be in 1..{vocab} (the vocabulary size); got {top_k}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")
    if not rows:
        raise UserError("no training rows to cache")
    shard_rows = shard_rows or default_shard_rows(data["settings"]["max_seq_len"], top_k, logprobs_dtype)
    total = -(-len(rows) // shard_rows)
    identity = {"teacher": dict(teacher_info), "tokenizer_sha256": tokenizer_hash(tokenizer), "vocab_size": vocab,
                "data": data, "rows": len(rows), "top_k": top_k, "logprobs_dtype": logprobs_dtype,
                "shard_rows": shard_rows, "shards_total": total}
    _check_out(out)
    lock = RunLock(out, "distill-cache")
    try:
        lock.acquire(log)
    except UserError as exc:
        raise UserError(str(exc).replace("output_dir", "--out").replace("a live run", "a running distill-cache")) from None
    try:
        clean_debris(out, (".tmp-",))
        previous = _previous(out, identity, overwrite, log)
        from swengine import __version__

        manifest = {"schema_version": SCHEMA_VERSION, "kind": KIND, "created_by": f"swengine {__version__}",
                    **identity, "temperature": 1.0, "cached_tokens": 0, "complete": False, "shards": []}
        kept = []
        for entry in (previous or {}).get("shards", []):
            if _shard_ok(out, entry):
                kept.append(entry)
            else:
                log(f"{entry['file']} fails its checksum: computing it again")
        manifest["shards"] = kept
        write_manifest(out, _totals(manifest))
        done = {entry["index"] for entry in kept}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model = None
        computed = 0
        for index in range(total):
            if index in done:
                continue
            if model is None:
                model = teacher() if callable(teacher) and not isinstance(teacher, torch.nn.Module) else teacher
            first = index * shard_rows
            part = rows[first:first + shard_rows]
            tensors = shard_tensors(model, part, top_k=top_k, vocab=vocab, batch_size=batch_size, device=device,
                                    pad_id=pad, logprobs_dtype=LOGPROB_DTYPES[logprobs_dtype])
            entry = _write_shard(out, index, first, tensors)
            manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["index"])
            write_manifest(out, _totals(manifest))
            computed += 1
            log(f"distill-cache: shard {index + 1}/{total} ({entry['rows']} rows, {entry['tokens']} tokens)")
            if after_shard is not None:
                after_shard(index)
        manifest["complete"] = True
        write_manifest(out, _totals(manifest))
        return BuildResult(manifest, computed, len(kept))
    finally:
        lock.release()


def _totals(manifest: dict) -> dict:
    manifest["cached_tokens"] = sum(entry["tokens"] for entry in manifest["shards"])
    return manifest


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8"}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file, byte-for-byte a function of its input: the library's writer orders the
    ``__metadata__`` keys by a hash map (a different order per process), so a resumed cache would
    differ from an uninterrupted one in its headers. Header: sorted JSON keys, padded with spaces to
    8 bytes; data: tensors by decreasing item size, then name (each stays aligned), little-endian."""
    import struct
    import sys

    if sys.byteorder != "little":
        raise NotImplementedError("distill-cache writes little-endian safetensors; this host is big-endian")
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict = {"__metadata__": dict(metadata)}
    blobs, offset = [], 0
    for name in order:
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _write_shard(out: Path, index: int, first: int, tensors: dict[str, torch.Tensor]) -> dict:
    name = shard_name(index)
    rows = tensors["row_hash"].shape[0]
    metadata = {"schema_version": str(SCHEMA_VERSION), "kind": KIND, "first_row": str(first), "rows": str(rows)}
    blob = safetensors_bytes(tensors, metadata)
    atomic_file(out / name, lambda p: p.write_bytes(blob))
    return {"index": index, "file": name, "first_row": first, "rows": rows, "tokens": int(tensors["positions"].numel()),
            "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


@torch.no_grad()
def shard_tensors(teacher: torch.nn.Module, rows: Sequence, *, top_k: int, vocab: int, batch_size: int,
                  device: str | torch.device, pad_id: int, logprobs_dtype: torch.dtype = torch.float16,
                  max_chunk_bytes: int = 64 << 20) -> dict[str, torch.Tensor]:
    """The cache tensors of consecutive ``rows`` (see the module doc). The teacher runs on
    micro-batches of ``batch_size`` rows, exactly as in training (:func:`collate`: input ids,
    position ids); its LM head is applied in chunks of positions (fp32 logits of at most
    ``max_chunk_bytes``), only at the cached positions. The head matmul runs in the teacher's
    dtype, as the online fused loss computes it; log-softmax, top-k and the tail in fp32."""
    from swengine.data.batches import collate
    from swengine.distill.loss import decoder_hidden
    from swengine.distill.teacher import lm_head
    from swengine.train.step import _causal_lm

    head = lm_head(teacher, "teacher").weight
    softcap = getattr(_causal_lm(teacher).config, "final_logit_softcapping", None)
    out_lp, out_idx, out_tail, out_pos, offsets = [], [], [], [], [0]
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(list(part), pad_id).items() if k != "real_tokens"}
        hidden = decoder_hidden(teacher, batch)
        for b, row in enumerate(part):
            pos = torch.tensor(cached_positions(row), dtype=torch.long)
            h = hidden[b, pos.to(hidden.device)]
            chunk = max(1, max_chunk_bytes // (4 * head.shape[0]))
            for c in range(0, h.shape[0], chunk):
                logits = (h[c:c + chunk] @ head.t())[:, :vocab].float()
                if softcap:
                    logits = softcap * torch.tanh(logits / softcap)
                lse = logits.logsumexp(-1, keepdim=True)
                top, idx = logits.topk(top_k, dim=-1, sorted=True)
                rest = logits.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
                out_lp.append((top - lse).to(logprobs_dtype).cpu())
                out_idx.append(idx.to(torch.int32).cpu())
                out_tail.append((rest - lse).exp().squeeze(-1).cpu())
            out_pos.append(pos.to(torch.int32))
            offsets.append(offsets[-1] + pos.numel())
    return {
        "logprobs": torch.cat([torch.zeros(0, top_k, dtype=logprobs_dtype), *out_lp]).contiguous(),
        "indices": torch.cat([torch.zeros(0, top_k, dtype=torch.int32), *out_idx]).contiguous(),
        "tail_mass": torch.cat([torch.zeros(0), *out_tail]).float().contiguous(),
        "positions": torch.cat(out_pos).contiguous(),
        "row_offsets": torch.tensor(offsets, dtype=torch.int64),
        "row_hash": torch.tensor([list(row_hash(r)) for r in rows], dtype=torch.uint8),
    }


def training_paths(data_train: str, data_eval: str, mix: bool = False) -> tuple[str, str]:
    """The training and eval files as `swengine train` resolves them ("" = the demo's; with
    data.mix the sources are the mix's)."""
    if not data_train and not mix:
        from swengine.model.load import DEMO_EVAL, DEMO_TRAIN

        return str(DEMO_TRAIN), data_eval or str(DEMO_EVAL)
    return data_train, data_eval


def distill_cache(out: str | Path, *, teacher: str, data_cfg, seed: int, top_k: int = 64, batch_size: int = 8,
                  device: str = "auto", dtype: str = "auto", quant: str = "none", tokenizer: str | None = None,
                  logprobs_dtype: str = "fp16", overwrite: bool = False, shard_rows: int | None = None,
                  attention: str = "sdpa", rope_scaling: dict | None = None, log: Callable[[str], None] = print,
                  after_shard: Callable[[int], None] | None = None) -> BuildResult:
    """`swengine distill-cache` from paths: the student's tokenizer (``tokenizer``, default the
    teacher's) checked against the teacher's, the training rows prepared as `swengine train`
    prepares them (``data_cfg``: the run's :class:`DataConfig`; ``seed``: its seed), then
    :func:`build_cache`. The teacher is loaded only if a shard is left to compute."""
    from swengine.data.dataset import prepare
    from swengine.distill.teacher import check_vocab, load_teacher
    from swengine.model import load as model_load

    teacher_dir = model_load.model_path(teacher) if teacher else ""
    if not teacher_dir:
        raise UserError("--teacher is required (a model directory or hub id)")
    student_tok = model_load.load_tokenizer(model_load.model_path(tokenizer) if tokenizer else teacher_dir)
    teacher_tok = student_tok if not tokenizer else model_load.load_tokenizer(teacher_dir)
    teacher_config = model_load.load_config(teacher_dir, 0, {})
    rows_needed = getattr(teacher_config, "vocab_size", None)
    vocab = check_vocab(student_tok, teacher_tok, None, rows_needed)
    train_path, eval_path = training_paths(data_cfg.train, data_cfg.eval, bool(data_cfg.mix))
    prepared = prepare(data_cfg, student_tok, train_path, eval_path, seed)
    torch_device = model_load.resolve_device(device)
    torch_dtype = model_load.resolve_dtype(dtype, torch_device)
    dtype_name = {v: k for k, v in model_load.DTYPES.items()}[torch_dtype]
    info = {"id": teacher, "quant": quant, "dtype": dtype_name}
    data = data_identity(data_cfg, train_path, eval_path, seed)

    def load():
        log(f"distill-cache: loading the teacher {teacher} ({dtype_name}{', ' + quant if quant != 'none' else ''}) "
            f"on {torch_device}")
        return load_teacher(teacher, dtype=torch_dtype, device=torch_device, quant=quant, attention=attention,
                            max_seq_len=data_cfg.max_seq_len, rope_scaling=rope_scaling)

    return build_cache(out, prepared.train, teacher=load, teacher_info=info, tokenizer=student_tok, data=data,
                       top_k=top_k, batch_size=batch_size, device=torch_device, logprobs_dtype=logprobs_dtype,
                       shard_rows=shard_rows, vocab_size=vocab, overwrite=overwrite, log=log,
                       after_shard=after_shard)


# ---------------------------------------------------------------- reading


class Cache:
    """A verified distill cache, read lazily (memory-mapped shards)."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = Path(directory)
        self.manifest = manifest
        self.top_k: int = manifest["top_k"]
        self.vocab_size: int = manifest["vocab_size"]
        self.rows: int = manifest["rows"]
        self.shard_rows: int = manifest["shard_rows"]
        self._open: dict[int, tuple] = {}

    def _shard(self, index: int):
        if index not in self._open:
            from safetensors import safe_open

            f = safe_open(str(self.directory / shard_name(index)), framework="pt")
            self._open[index] = (f, f.get_tensor("row_offsets"), f.get_tensor("row_hash"))
        return self._open[index]

    def row_hash(self, row: int) -> bytes:
        f, _, hashes = self._shard(row // self.shard_rows)
        return bytes(hashes[row % self.shard_rows].tolist())

    def row(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions (n,), logprobs (n, k) fp32, indices (n, k) int64, tail_mass (n,)) of one row."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} is outside the cache's {self.rows} rows")
        f, offsets, _ = self._shard(row // self.shard_rows)
        local = row % self.shard_rows
        a, b = int(offsets[local]), int(offsets[local + 1])
        return (f.get_slice("positions")[a:b].long(), f.get_slice("logprobs")[a:b].float(),
                f.get_slice("indices")[a:b].long(), f.get_slice("tail_mass")[a:b])

    def batch_topk(self, row_indices: Sequence[int], seq_len: int,
                   device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs, indices), each (len(row_indices), seq_len, k), for a micro-batch made of these
        rows (in this order) and padded to ``seq_len``: the ``topk`` argument of
        :func:`swengine.distill.loss.distill_step_loss`. Positions that carry no loss hold zeros."""
        n = len(row_indices)
        logprobs = torch.zeros(n, seq_len, self.top_k, dtype=torch.float32)
        indices = torch.zeros(n, seq_len, self.top_k, dtype=torch.long)
        for b, row in enumerate(row_indices):
            pos, lp, idx, _ = self.row(int(row))
            logprobs[b, pos] = lp
            indices[b, pos] = idx
        if device is not None:
            logprobs, indices = logprobs.to(device, non_blocking=True), indices.to(device, non_blocking=True)
        return logprobs, indices

    def check_rows(self, rows: Sequence) -> None:
        """Every training row equals the cached one (count, then content hashes)."""
        where = f"distill.cache={self.directory}"
        if len(rows) != self.rows:
            raise UserError(f"{where} holds {self.rows} training rows, this run prepares {len(rows)} from the same "
                            f"data; rebuild it with this run's data.* settings: {HOW_TO_BUILD}")
        for i, row in enumerate(rows):
            if row_hash(row) != self.row_hash(i):
                raise UserError(f"{where}: training row {i} differs from the cached one (tokenized differently: "
                                f"another tokenizer or chat template?); rebuild it with the student's tokenizer: "
                                f"{HOW_TO_BUILD} --tokenizer STUDENT")


def open_cache(directory: str | Path, tokenizer, data_path: str, data_cfg, *, seed: int, eval_path: str = "",
               rows: Sequence | None = None, verify: bool = True) -> Cache:
    """The cache in ``directory`` (``distill.cache``), checked against this run: complete; built
    from the same data file (sha256 of its bytes), tokenizer (vocabulary hash), data settings
    and seed; with ``rows`` (the prepared training rows) the same rows; with ``verify`` every
    shard's sha256. Anything else is a one-line :class:`UserError` naming what differs."""
    from swengine.distill.teacher import tokenizer_hash

    directory = Path(directory)
    where = f"distill.cache={directory}"
    if not directory.is_dir():
        raise UserError(f"{where} is not a directory; build the cache first: {HOW_TO_BUILD}")
    manifest = read_manifest(directory)
    if manifest is None:
        raise UserError(f"{where} has no {MANIFEST}; build the cache first: {HOW_TO_BUILD}")
    if not manifest.get("complete"):
        raise UserError(f"{where} is incomplete ({len(manifest['shards'])} of {manifest['shards_total']} shards); "
                        "rerun the distill-cache command that built it to finish it")
    data = data_identity(data_cfg, data_path, eval_path, seed)
    built = manifest["data"]
    if built["sha256"] != data["sha256"]:
        raise UserError(f"{where}: cache built for another data file ({built['path']}, sha256 {built['sha256'][:12]}…; "
                        f"{data_path} has {data['sha256'][:12]}…); rebuild it for this data: {HOW_TO_BUILD}")
    if manifest["tokenizer_sha256"] != tokenizer_hash(tokenizer):
        raise UserError(f"{where}: tokenizer differs from the one the cache was built with (vocabulary hash "
                        f"{manifest['tokenizer_sha256'][:12]}…, the student's {tokenizer_hash(tokenizer)[:12]}…); "
                        f"rebuild it with the student's tokenizer: {HOW_TO_BUILD} --tokenizer STUDENT")
    wanted = {**data["settings"], "seed": data["seed"]}
    have = {**built["settings"], "seed": built["seed"]}
    for key, value in wanted.items():
        if have.get(key) != value:
            name = key if key == "seed" else f"data.{key}"
            raise UserError(f"{where} was built with {name}={json.dumps(have.get(key))}, this run has "
                            f"{name}={json.dumps(value)}; set it back or rebuild the cache with this run's settings: "
                            f"{HOW_TO_BUILD}")
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if not path.is_file():
            raise UserError(f"{where}: shard {entry['index']} ({entry['file']}) is missing; rerun the distill-cache "
                            "command that built it (it recomputes missing or corrupt shards)")
        if path.stat().st_size != entry["bytes"] or (verify and file_sha256(path) != entry["sha256"]):
            raise UserError(f"{where}: corrupt shard {entry['index']} ({entry['file']}: checksum); rerun the "
                            "distill-cache command that built it (it recomputes corrupt shards)")
    cache = Cache(directory, manifest)
    if rows is not None:
        cache.check_rows(rows)
    return cache


def batch_rows(stream) -> list[int]:
    """The row indices (into ``Prepared.train``) of the batch a
    :class:`swengine.data.batches.BatchStream` returned last, in batch order: call right after
    ``stream.next()`` (its position has just moved past them)."""
    return list(stream.last_rows)

