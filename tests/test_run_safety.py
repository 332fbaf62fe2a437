"""Runs never lose data (issue 13, items 1-5 and part of 8): output-dir ownership, exact resume
after SIGINT/SIGTERM, verified checkpoints with fallback, disk full, strict-JSON telemetry.

Mostly in-process Trainer runs on a tiny llama (torch backend, CPU); one real subprocess for a
live second run and an external SIGTERM."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch

from swengine.config import load_config
from swengine.errors import UserError
from swengine.model.load import DEMO_TRAIN
from swengine.telemetry import MetricsLogger, read_events
from swengine.train import checkpoint as ckpt
from swengine.train import step as step_mod
from swengine.train.lock import LOCK_NAME, RunLock
from swengine.train.stops import RunStopped
from swengine.train.trainer import Trainer
from swkernels._backend import force_backend
from tests.test_train_e2e import make_model

ROOT = Path(__file__).parents[1]
TELEMETRY = json.loads((ROOT / "specs" / "telemetry.schema.json").read_text())
STEPS = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    data = root / "train.jsonl"
    data.write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:96]) + "\n")
    return {"root": root, "model": make_model(root, "llama"), "data": data}


@pytest.fixture(scope="module", autouse=True)
def _torch_backend():
    """In-process runs as a CPU user runs them: the torch fallbacks, not the Triton interpreter
    (module scope, so that it is in force for the module-scoped reference run too)."""
    with pytest.MonkeyPatch.context() as mp, force_backend("torch"):
        mp.delenv("TRITON_INTERPRET", raising=False)
        yield


def overrides(env, out: Path, steps: int = STEPS, *extra: str) -> list[str]:
    return [f"model.path={env['model']}", f"data.train={env['data']}", f"output_dir={out}",
            f"schedule.max_steps={steps}", "schedule.micro_batch_size=4", "schedule.grad_accumulation=2",
            "data.max_seq_len=64", "optim.lr=3e-3", "schedule.warmup_steps=2", "logging.every=1",
            "logging.eval_every=0", "checkpointing.save_every=2", "checkpointing.keep_last=2", "lora.rank=8",
            "lora.alpha=16", "lora.dropout=0.1", *extra]


def train(env, out: Path, *extra: str, steps: int = STEPS, resume: str | None = None, overwrite: bool = False):
    """(result or the RunStopped/UserError raised, the lines the run logged)."""
    lines: list[str] = []
    cfg = load_config(None, overrides(env, out, steps, *extra))
    try:
        return Trainer(cfg, resume=resume, log=lines.append, overwrite=overwrite).run(), lines
    except (RunStopped, UserError) as exc:
        return exc, lines


def losses(out: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_events(out / "metrics.jsonl", "train")]


def last_losses(out: Path) -> dict[int, float]:
    return dict(losses(out))  # later (resumed) events win


def valid_events(out: Path) -> list[dict]:
    events = read_events(out / "metrics.jsonl")
    for e in events:
        jsonschema.validate(e, TELEMETRY)
    return events


@pytest.fixture(scope="module")
def reference(env):
    """The uninterrupted run every resumed run must reproduce bit for bit."""
    out = env["root"] / "reference"
    result, _ = train(env, out)
    assert not isinstance(result, Exception), result
    return last_losses(out)


def in_step_signal(monkeypatch, signum: int, at_call: int, count: int = 1):
    """Send ``signum`` (``count`` times) to ourselves during the ``at_call``-th micro-batch
    forward/backward: a point inside an optimizer step."""
    real = step_mod.forward_backward
    calls = {"n": 0}

    def fb(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            for _ in range(count):
                os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr("swengine.train.trainer.forward_backward", fb)


# ---------------------------------------------------------------- 1. the output dir is owned


def test_a_second_live_run_is_refused_and_a_stale_lock_is_taken_over(env, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    live = RunLock(out, "other-run")
    live.acquire()
    try:
        err, _ = train(env, out)
        assert isinstance(err, UserError)
        assert f"pid {os.getpid()}" in str(err) and "in use by a live run" in str(err)
        assert not (out / "checkpoints").exists()
    finally:
        live.release()
    # a lock file left by a process that died (kill -9): flock is gone, its text remains
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "h", "started": "then"}))
    result, lines = train(env, out, steps=2)
    assert not isinstance(result, Exception), result
    assert any("taking over the stale lock" in line and "999999" in line for line in lines)


def test_a_used_dir_needs_resume_or_overwrite_and_overwrite_archives(env, tmp_path, reference):
    out = tmp_path / "run"
    result, _ = train(env, out)
    assert not isinstance(result, Exception)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    err, _ = train(env, out, steps=3)
    assert isinstance(err, UserError) and "--resume auto" in str(err) and "--overwrite" in str(err)
    assert "\n" not in str(err)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing touched

    result, lines = train(env, out, steps=3, overwrite=True)
    assert not isinstance(result, Exception) and result.steps == 3
    archived = list((out / "archive").iterdir())
    assert len(archived) == 1 and sorted(p.name for p in (archived[0] / "checkpoints").iterdir()) == before
    assert (archived[0] / "adapter" / "adapter_model.safetensors").is_file()
    assert last_losses(archived[0]) == reference
    # the new run's checkpoints survive, the old run's are neither pruned nor resumed
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002", "step-00000003"]
    assert ckpt.read_state(ckpt.list_checkpoints(out)[-1])["step"] == 3
    events = valid_events(out)
    assert len({e["run_id"] for e in events}) == 1


# ---------------------------------------------------------------- 2. exact resume after any stop


# three fixed points (first micro-batch, a step's first, a step's last) and two drawn at random
# (seeded, so a failure reproduces) among all the micro-batch forward passes of the run
_DRAW = random.Random(20261201)
SIGNAL_POINTS = [(signal.SIGINT, 5), (signal.SIGTERM, 8), (signal.SIGINT, 1),
                 (signal.SIGINT, _DRAW.randint(1, 2 * STEPS - 1)), (signal.SIGTERM, _DRAW.randint(1, 2 * STEPS - 1))]


@pytest.mark.parametrize("signum,at_call", SIGNAL_POINTS)
def test_a_signal_inside_a_step_saves_a_checkpoint_that_resumes_exactly(env, tmp_path, reference, monkeypatch,
                                                                        signum, at_call):
    out = tmp_path / "run"
    in_step_signal(monkeypatch, signum, at_call)
    stop, _ = train(env, out)
    assert isinstance(stop, RunStopped) and stop.code == 128 + signum, stop
    done = (at_call + 1) // 2  # 2 micro-batches per step: the signalled step is finished, then saved
    assert f"at step {done}" in str(stop) and "--resume auto" in str(stop)
    assert ckpt.read_state(ckpt.list_checkpoints(out)[-1])["step"] == done
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    with force_backend("torch"):
        result, lines = train(env, out, resume="auto")
    assert not isinstance(result, Exception), result
    assert any("resumed from" in line for line in lines)
    assert last_losses(out) == reference  # bit-identical, every step
    ends = [e["status"] for e in valid_events(out) if e["event"] == "run_end"]
    assert ends == ["interrupted", "completed"]


def test_a_keyboard_interrupt_inside_a_step_rolls_the_step_back(env, tmp_path, reference, monkeypatch):
    """Without our handler (e.g. not the main thread) Ctrl-C arrives as KeyboardInterrupt in the
    middle of a step: the half-done step is undone, not counted."""
    out = tmp_path / "run"
    real = step_mod.forward_backward
    calls = {"n": 0}

    def fb(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # the second micro-batch of step 3
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("swengine.train.trainer.forward_backward", fb)
    monkeypatch.setattr("swengine.train.trainer.threading.main_thread", lambda: None)  # no handlers
    stop, _ = train(env, out)
    assert isinstance(stop, RunStopped) and stop.code == 130 and "at step 2" in str(stop)
    monkeypatch.undo()
    with force_backend("torch"):
        result, _ = train(env, out, resume="auto")
    assert not isinstance(result, Exception), result
    assert last_losses(out) == reference


def test_a_second_signal_waits_for_the_save_a_third_abandons_it(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *a, **k):  # signals arrive while the interrupted checkpoint is written
        real_save(obj, f, *a, **k)
        if "step-00000003" in str(f) and str(f).endswith("optimizer.pt"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr("swengine.train.trainer.torch.save", save)
    in_step_signal(monkeypatch, signal.SIGTERM, 5)
    stop, _ = train(env, out)
    assert isinstance(stop, RunStopped) and stop.code == 143 and "checkpoint" in str(stop)
    assert ckpt.newest_valid(out).name == "step-00000003"  # the second signal waited for the save

    out2 = tmp_path / "run2"
    in_step_signal(monkeypatch, signal.SIGTERM, 5, count=2)  # 2 during the step, the 3rd during the save
    stop, _ = train(env, out2)
    assert isinstance(stop, RunStopped) and stop.code == 143, stop
    assert "third SIGTERM" in str(stop) and "step-00000002 is intact" in str(stop)
    assert [p.name for p in (out2 / "checkpoints").iterdir()] == ["step-00000002"]  # no debris
    ckpt.verify(out2 / "checkpoints" / "step-00000002")


# ---------------------------------------------------------------- 3. verified checkpoints


def test_truncating_any_checkpoint_file_falls_back_to_the_previous_one(env, tmp_path):
    out = tmp_path / "run"
    result, _ = train(env, out, steps=4)
    assert not isinstance(result, Exception)
    newest = out / "checkpoints" / "step-00000004"
    files = sorted(p for p in newest.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"manifest.json", "trainer_state.json", "optimizer.pt",
                                       "adapter_model.safetensors", "rng.pt"}
    for f in files:
        saved = f.read_bytes()
        f.write_bytes(saved[: len(saved) // 2])
        lines: list[str] = []
        assert ckpt.newest_valid(out, lines.append).name == "step-00000002", f.name
        assert len(lines) == 1 and "step-00000004" in lines[0], lines
        f.write_bytes(saved)
    # end to end once: the corrupt newest is skipped with a message and the run resumes from step 2
    (newest / "optimizer.pt").write_bytes(b"")
    result, lines = train(env, out, steps=5, resume="auto")
    assert not isinstance(result, Exception), result
    assert any("skipping checkpoint" in line and "step-00000004" in line for line in lines)
    assert any("resumed from" in line and "step-00000002" in line for line in lines)
    assert [s for s, _ in losses(out)][-3:] == [3, 4, 5]


def test_resuming_with_another_rank_is_one_line(env, tmp_path):
    out = tmp_path / "run"
    train(env, out, steps=2)
    err, _ = train(env, out, "lora.rank=4", "lora.alpha=8", steps=4, resume="auto")
    assert isinstance(err, UserError) and "lora.rank=8" in str(err) and "lora.rank=4" in str(err)
    assert "\n" not in str(err)


def test_debris_is_cleaned_and_pruning_never_shows_a_partial_step(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step-00000004-123").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-00000004-123" / "optimizer.pt").write_bytes(b"x" * 1000)
    (out / "checkpoints" / ".old-step-00000002-99").mkdir()
    (out / ".tmp-adapter-77").mkdir()
    result, lines = train(env, out, steps=2, resume="auto")
    assert not isinstance(result, Exception)
    assert any("removed 3 stale temporary" in line for line in lines)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not (out / ".tmp-adapter-77").exists()

    seen = []
    real_rmtree = ckpt.shutil.rmtree

    def rmtree(path, *a, **k):  # at every deletion, every visible step-N is complete
        seen.append(Path(path).name)
        for p in ckpt.all_step_dirs(out):
            ckpt.verify(p)
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    result, _ = train(env, out, steps=6, resume="auto")
    assert not isinstance(result, Exception)
    assert any(name.startswith(".old-step-") for name in seen)
    assert [p.name for p in ckpt.all_step_dirs(out)] == ["step-00000004", "step-00000006"]


# ---------------------------------------------------------------- 4. telemetry


def test_telemetry_is_strict_json_with_run_ids_and_a_torn_line_is_tolerated(env, tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(path, run_id="r1")
    log.log("train", step=1, loss=float("nan"), lr=float("inf"), tokens=1, tokens_per_second=1.0,
            peak_memory_bytes=1, memory_kind="process_rss", grad_norm=torch.tensor(float("-inf")))
    log.log("run_start", step=0, model="m", device="cpu", dtype="float32", trainable_params=1, total_steps=1,
            config={"optim": {"lr": float("inf")}})
    log.close()
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
            for line in text.splitlines()]
    assert rows[0]["lr"] is None and rows[0]["loss"] is None and set(rows[0]["nonfinite"]) == {"loss", "lr",
                                                                                               "grad_norm"}
    assert rows[1]["config"]["optim"]["lr"] is None and rows[1]["nonfinite"] == ["config.optim.lr"]
    for row in rows:
        jsonschema.validate(row, TELEMETRY)
        assert row["run_id"] == "r1"

    with open(path, "a") as f:  # a crash in the middle of a write
        f.write('{"event": "train", "st')
    warned = []
    assert len(read_events(path, on_torn=warned.append)) == 2 and "torn last line" in warned[0]
    with pytest.warns(UserWarning, match="torn last line"):
        read_events(path)
    notes = []
    MetricsLogger(path, run_id="r2", log=notes.append).log("eval", step=2, eval_loss=1.0)  # the next run
    assert "torn last line" in notes[0]
    assert [r["run_id"] for r in read_events(path)] == ["r1", "r1", "r2"]  # no warning: repaired


def test_lr_inf_or_a_diverging_run_writes_valid_json(env, tmp_path):
    """lr=inf never reaches metrics.jsonl as Infinity (config validation may refuse it); a run whose
    loss and gradients blow up (safety off) writes null plus the nonfinite flag."""
    try:
        load_config(None, overrides(env, tmp_path / "inf", 2, "optim.lr=inf"))
    except UserError as exc:
        assert "optim.lr" in str(exc)
    else:
        result, _ = train(env, tmp_path / "inf", "optim.lr=inf", "safety.enabled=false", steps=2)
        assert "Infinity" not in (tmp_path / "inf" / "metrics.jsonl").read_text()
    out = tmp_path / "run"
    result, _ = train(env, out, "optim.lr=1e30", "schedule.warmup_steps=0", "safety.enabled=false", steps=3)
    assert not isinstance(result, Exception), result
    text = (out / "metrics.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text
    events = valid_events(out)
    flagged = [e for e in events if e["event"] == "train" and e.get("nonfinite")]
    assert flagged and all(e["loss"] is None for e in flagged if "loss" in e["nonfinite"])


# ---------------------------------------------------------------- 5. disk full, bad output_dir


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *a, **k):
        if "step-00000004" in str(f) and str(f).endswith("optimizer.pt"):
            with open(f, "wb") as fh:
                fh.write(b"\0" * (3 << 20))  # 3 MB written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr("swengine.train.trainer.torch.save", save)
    stop, _ = train(env, out)
    assert isinstance(stop, RunStopped) and stop.code == 3
    msg = str(stop)
    assert msg.startswith("error: no space left on ") and "freed 3." in msg and "MB of partial output" in msg
    assert "the last checkpoint step-00000002 is intact" in msg and "\n" not in msg
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # temporary removed
    ckpt.verify(out / "checkpoints" / "step-00000002")
    assert valid_events(out)[-1]["status"] == "failed"
    monkeypatch.undo()
    with force_backend("torch"):
        result, _ = train(env, out, resume="auto")  # space is back: continue
    assert not isinstance(result, Exception), result


def test_disk_full_in_telemetry_leaves_no_half_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(path, run_id="r")
    log.log("eval", step=1, eval_loss=1.0)
    real_write = os.write

    def write(fd, data):
        real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError):
        log.log("eval", step=2, eval_loss=1.0)
    monkeypatch.undo()
    log.close()
    assert [e["step"] for e in read_events(path)] == [1]
    assert path.read_text().endswith("}\n")


def test_bad_output_dir_is_one_line(env, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    err, _ = train(env, afile)
    assert isinstance(err, UserError) and "is a file" in str(err)
    err, _ = train(env, afile / "sub")
    assert isinstance(err, UserError) and "cannot create output_dir" in str(err)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root writes anywhere
            err, _ = train(env, Path("/proc/swengine-run"))
            assert isinstance(err, UserError) and "output_dir" in str(err)
        else:
            err, _ = train(env, ro)
            assert isinstance(err, UserError) and "not writable" in str(err)
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------- the real CLI, two processes


def _cli(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, "-c", "from swengine.cli import main; main()", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    from swengine.cli import main

    old = sys.argv
    sys.argv = ["swengine", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_live_race_and_external_sigterm_then_exact_resume(env, tmp_path, capsys):
    """A real process: a second run in its dir is refused while it lives; SIGTERM from outside
    stops it with exit 143 and one line; --resume auto then reproduces an uninterrupted run."""
    out = tmp_path / "run"
    const = ("schedule.scheduler=constant", "schedule.warmup_steps=0")  # lr independent of max_steps
    args = ["train", *overrides(env, out, 400, *const)]
    p = _cli(args)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if (out / "metrics.jsonl").is_file() and read_events(out / "metrics.jsonl", "train",
                                                                 on_torn=lambda m: None):
                break
            time.sleep(0.05)
        assert p.poll() is None, p.communicate()
        code, _, err = _main(args, capsys)  # a second run in the same dir while the first is live
        assert code == 2 and "in use by a live run" in err and f"pid {p.pid}" in err
        assert len(_lines(err)) == 1 and "Traceback" not in err
        p.send_signal(signal.SIGTERM)
        _, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, stderr[-2000:]
    lines = _lines(stderr)  # progress and notices, then the one line that says how the run ended
    assert "Traceback" not in stderr and lines[-1].startswith("stopped by SIGTERM"), stderr
    stopped_at = ckpt.read_state(ckpt.list_checkpoints(out)[-1])["step"]

    code, _, err = _main(args, capsys)  # used dir, no --resume
    assert code == 2 and "--resume auto" in err and "--overwrite" in err

    steps = stopped_at + 2
    code, _, err = _main(["train", *overrides(env, out, steps, *const), "--resume", "auto"], capsys)
    assert code == 0, err
    ref = tmp_path / "ref"
    result, _ = train(env, ref, *const, steps=steps)
    assert not isinstance(result, Exception), result
    assert last_losses(out) == last_losses(ref)
    valid_events(out)


def test_cli_disk_full_exits_3_with_one_line(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *a, **k):
        if "step-00000002" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr("swengine.train.trainer.torch.save", save)
    code, _, err = _main(["train", *overrides(env, out, 3)], capsys)
    lines = _lines(err)  # progress and notices, then the one line that says how the run ended
    assert code == 3 and lines[-1].startswith("error: no space left on") and "Traceback" not in err, err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    assert "no checkpoint had been saved yet" in err


def test_a_real_full_disk_tmpfs(env, tmp_path, reference):
    """A tiny tmpfs (where mounting is permitted): the write really fails with ENOSPC."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    size = ckpt.tree_size(env["root"] / "reference" / "checkpoints" / "step-00000006")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        (mnt / "filler").write_bytes(b"\0" * (free - int(1.6 * size) - (64 << 10)))  # room for one checkpoint
        stop, _ = train(env, mnt / "run")
        assert isinstance(stop, RunStopped) and stop.code == 3, stop
        assert f"tmpfs ({mnt})" in str(stop) and "the last checkpoint step-00000002 is intact" in str(stop)
        assert [p.name for p in (mnt / "run" / "checkpoints").iterdir()] == ["step-00000002"]
        ckpt.verify(mnt / "run" / "checkpoints" / "step-00000002")
        valid_events(mnt / "run")
        (mnt / "filler").unlink()
        result, _ = train(env, mnt / "run", resume="auto")
        assert not isinstance(result, Exception), result
        assert last_losses(mnt / "run") == reference
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _lines(err: str) -> list[str]:
    """stderr without transformers' progress bars."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "Loading weights" not in line]
