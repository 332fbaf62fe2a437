"""`swengine rollback` (swengine/train/rollback.py): on a real tiny run, rolling back restores the
target's adapter bit for bit, archives (never deletes) what came after, and `--resume auto` then
continues from the target and reproduces the original run's losses exactly (CPU). Targets
phase-N / step-N / best / last-good, a live run's lock, and bad input as one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from swengine.config import load_config
from swengine.errors import UserError
from swengine.telemetry import read_events
from swengine.train import checkpoint as ckpt
from swengine.train import rollback as rb
from swengine.train.lock import RunLock
from swengine.train.rollback_cli import rollback_command
from swengine.train.trainer import Trainer
from swkernels._backend import force_backend

ROOT = Path(__file__).parents[1]
STEPS = 8
ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module", autouse=True)
def _quiet_cpu():
    """One thread (the box is shared) and the torch fallbacks, as a CPU user runs them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp, force_backend("torch"):
        mp.delenv("TRITON_INTERPRET", raising=False)
        yield
    torch.set_num_threads(threads)


def config(model: Path, data: Path, out: Path, steps: int = STEPS):
    return load_config(None, [f"model.path={model}", f"data.train={data}", f"output_dir={out}",
                              f"schedule.max_steps={steps}", "schedule.micro_batch_size=4",
                              "schedule.grad_accumulation=1", "data.max_seq_len=64", "optim.lr=3e-3",
                              "schedule.warmup_steps=2", "logging.every=1", "logging.eval_every=2",
                              "data.eval_fraction=0.1", "checkpointing.save_every=2",
                              "checkpointing.keep_last=10", "lora.rank=4", "lora.alpha=8", "logging.progress=false"])


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(out / "metrics.jsonl", "train")}  # later events win


@pytest.fixture(scope="module")
def run(tiny_llama, tiny_train_data, tmp_path_factory):
    """A finished 8-step run: checkpoints at steps 2, 4, 6 and the final one at 8, adapter/."""
    out = tmp_path_factory.mktemp("rollback") / "run"
    Trainer(config(tiny_llama, tiny_train_data, out), log=lambda m: None).run()
    return {"out": out, "model": tiny_llama, "data": tiny_train_data, "losses": losses(out)}


def copy_run(run, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    return out


def edit_state(path: Path, **changes) -> None:
    """Change a checkpoint's trainer_state.json and re-sign its manifest (as the trainer would have
    written it: a phase checkpoint, a checkpoint written after a trip)."""
    state = ckpt.read_state(path)
    state.update(changes)
    (path / ckpt.STATE_NAME).write_text(json.dumps(state, indent=2))
    ckpt.write_manifest(path)


def steps_in(out: Path) -> list[int]:
    return [ckpt.step_of(p) for p in ckpt.all_step_dirs(out)]


# ---------------------------------------------------------------- restore, archive, resume


def test_rollback_restores_bitwise_archives_and_resumes_exactly(run, tmp_path):
    out = copy_run(run, tmp_path)
    assert steps_in(out) == [2, 4, 6, 8] and (out / "adapter").is_dir()
    target = out / "checkpoints" / ckpt.checkpoint_name(4)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    final_adapter = (out / "adapter" / ADAPTER).read_bytes()

    result = rb.rollback(out, "step-4", log=lambda m: None)

    assert steps_in(out) == [2, 4]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the target is untouched
    assert (out / "adapter" / ADAPTER).read_bytes() == before[ADAPTER]  # adapter/ = the target's, bit for bit
    assert (out / "adapter" / "adapter_config.json").read_bytes() == before["adapter_config.json"]
    archive = result.archive
    assert archive.parent == out / "archive" and archive.name.startswith("rollback-")
    assert sorted(p.name for p in (archive / "checkpoints").iterdir()) == [ckpt.checkpoint_name(6),
                                                                           ckpt.checkpoint_name(8)]
    for p in (archive / "checkpoints").iterdir():
        ckpt.verify(p)  # moved whole, still valid
    assert (archive / "adapter" / ADAPTER).read_bytes() == final_adapter
    assert json.loads((archive / "rollback.json").read_text())["rolled_back_to"] == target.name
    assert set(result.moved) == {"checkpoints/" + ckpt.checkpoint_name(6), "checkpoints/" + ckpt.checkpoint_name(8),
                                 "adapter"}
    words = rb.done_words(out, result)
    assert "--resume auto" in words and str(target / "config.yaml") in words

    lines: list[str] = []
    cfg = load_config(str(target / "config.yaml"), [f"output_dir={out}"])  # the config the hint names (the run moved)
    resumed = Trainer(cfg, resume="auto", log=lines.append).run()
    assert any(f"resumed from {target}" in line for line in lines)
    assert resumed.steps == STEPS and steps_in(out)[-1] == STEPS
    redone = {s: v for s, v in losses(out).items() if s > 4}
    assert redone == {s: v for s, v in run["losses"].items() if s > 4}  # bit-identical on CPU
    assert (out / "adapter" / ADAPTER).read_bytes() == final_adapter


def test_rolling_back_to_the_newest_changes_nothing_but_a_stale_adapter(run, tmp_path):
    out = copy_run(run, tmp_path)
    result = rb.rollback(out, "step-8", log=lambda m: None)
    assert result.archive is None and result.moved == [] and steps_in(out) == [2, 4, 6, 8]
    assert "already the newest checkpoint" in rb.done_words(out, result)
    shutil.rmtree(out / "adapter")  # a run stopped before writing adapter/: restored from the target
    rb.rollback(out, "last-good", log=lambda m: None)
    assert (out / "adapter" / ADAPTER).read_bytes() == (out / "checkpoints" / ckpt.checkpoint_name(8) / ADAPTER).read_bytes()


# ---------------------------------------------------------------- targets


def test_targets_phase_best_and_last_good(run, tmp_path):
    out = copy_run(run, tmp_path)
    c = {s: out / "checkpoints" / ckpt.checkpoint_name(s) for s in (2, 4, 6, 8)}
    edit_state(c[2], phase="phase-1")
    edit_state(c[4], phase="phase-1", kind="phase", completed_phase="phase-1")
    edit_state(c[6], phase="phase-2", kind="phase", completed_phase="phase-2", tripped=True)
    edit_state(c[8], phase="phase-3", tripped=True)
    entries = rb.scan(out)
    named = rb.targets(entries)
    assert named["phase-1"].step == 4 and named["phase-2"].step == 6
    assert named["last-good"].step == 4  # 6 and 8 were written after a breaker trip
    best = min(range(2, 8, 2), key=lambda s: next(e["eval_loss"] for e in read_events(out / "metrics.jsonl", "eval")
                                                 if e["step"] == s))
    assert named["best"].step == best
    assert rb.last_good(out, log=lambda m: None) == c[4]  # in a run: the newest untripped that verifies
    assert rb.last_good(out, before=4, log=lambda m: None) == c[2]  # older than the trip's first step
    (c[4] / ADAPTER).write_bytes(b"corrupt")  # fails verification: no longer a target
    skipped: list[str] = []
    assert rb.last_good(out, log=skipped.append) == c[2] and len(skipped) == 1 and c[4].name in skipped[0]
    named = rb.targets(rb.scan(out))
    assert named["last-good"].step == 2 and "phase-1" not in named

    with pytest.raises(UserError, match=r"^no checkpoint completes phase-5; valid phases: phase-2 \(or step-2, step-6, "
                                        r"step-8, best, last-good\)$"):
        rb.rollback(out, "phase-5", log=lambda m: None)
    with pytest.raises(UserError, match=r"step-00000004 fails verification \(adapter_model.safetensors has 7 bytes"):
        rb.rollback(out, "step-4", log=lambda m: None)
    result = rb.rollback(out, "phase-2", log=lambda m: None)
    assert result.target.step == 6 and steps_in(out) == [2, 4, 6]
    listing = rb.describe(*rb.listing(out))
    assert "phase-2" in listing and "NO: adapter_model.safetensors has 7 bytes" in listing


@pytest.fixture(scope="module")
def phased(tiny_llama, tiny_train_data, tmp_path_factory):
    """A finished context-extension run: phase-1 at 32 tokens, phase-2 at 64, 3 steps each."""
    out = tmp_path_factory.mktemp("phased") / "run"
    cfg = load_config(None, [f"model.path={tiny_llama}", f"data.train={tiny_train_data}", f"output_dir={out}",
                             "context.phases=[32, 64]", "context.phase_steps=3", "schedule.micro_batch_size=4",
                             "optim.lr=3e-3", "schedule.warmup_steps=1", "logging.every=1", "logging.eval_every=2",
                             "data.eval_fraction=0.1", "checkpointing.save_every=2", "checkpointing.keep_last=10",
                             "lora.rank=4", "lora.alpha=8", "logging.progress=false"])
    Trainer(cfg, log=lambda m: None).run()
    return out


def test_tools_rollback_target_phase_on_a_phased_run(phased, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(phased, out)
    original = losses(out)
    assert rb.targets(rb.scan(out))["phase-1"].step == 3
    tool = [sys.executable, str(ROOT / "tools" / "rollback.py"), "--run-dir", str(out)]
    bad = subprocess.run([*tool, "--target-phase", "2"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1  # the last phase ends the run: no phase checkpoint
    assert bad.stderr.startswith("error: no checkpoint completes phase-2; valid phases: phase-1 (or step-2, step-3")
    ok = subprocess.run([*tool, "--target-phase", "1"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"rolled back {out} to step-00000003 (step 3, phase-2): archived 2 later checkpoints")
    assert steps_in(out) == [2, 3]
    assert (out / "adapter" / ADAPTER).read_bytes() == (out / "checkpoints" / ckpt.checkpoint_name(3) / ADAPTER).read_bytes()
    cfg = load_config(str(out / "checkpoints" / ckpt.checkpoint_name(3) / "config.yaml"), [f"output_dir={out}"])
    Trainer(cfg, resume="auto", log=lambda m: None).run()  # phase-2 again, from its start
    assert {s: v for s, v in losses(out).items() if s > 3} == {s: v for s, v in original.items() if s > 3}


# ---------------------------------------------------------------- refusals and bad input


def test_refused_while_a_live_run_holds_the_lock(run, tmp_path):
    out = copy_run(run, tmp_path)
    live = RunLock(out, "live-run")
    live.acquire(lambda m: None)
    try:
        with pytest.raises(UserError, match=rf"^{out} is in use by a live run \(pid \d+ on .*\); stop it first"):
            rb.rollback(out, "step-2", log=lambda m: None)
    finally:
        live.release()
    assert steps_in(out) == [2, 4, 6, 8]
    rb.rollback(out, "step-2", log=lambda m: None)  # released: allowed
    assert steps_in(out) == [2]


def test_bad_input_is_one_line(run, tmp_path):
    out = copy_run(run, tmp_path)
    cases = [
        (tmp_path / "missing", "step-2", r"does not exist"),
        (tmp_path, "step-2", r"is not a swengine run directory \(no checkpoints/ or metrics.jsonl\)"),
        (out, "phase-1", r"no checkpoint completes phase-1: the run has no phase checkpoints .* valid targets: "
                         r"step-2, step-4, step-6, step-8, best, last-good"),
        (out, "step-3", r"no checkpoint at step 3; valid targets: step-2, step-4, step-6, step-8"),
        (out, "yesterday", r"--to 'yesterday': not a target; use phase-N, step-N, best or last-good"),
    ]
    for where, to, message in cases:
        with pytest.raises(UserError, match=message) as info:
            rb.rollback(where, to, log=lambda m: None)
        assert "\n" not in str(info.value)
    assert steps_in(out) == [2, 4, 6, 8]


def test_cli_lists_and_rolls_back(run, tmp_path):
    out = copy_run(run, tmp_path)
    app = typer.Typer()
    app.command()(rollback_command)
    cli = CliRunner()
    listed = cli.invoke(app, [str(out)])
    assert listed.exit_code == 0, listed.output
    assert "step-00000008" in listed.output and "last-good" in listed.output and "verifies" in listed.output
    data = json.loads(cli.invoke(app, [str(out), "--list", "--json"]).output)
    assert data["targets"]["last-good"] == ckpt.checkpoint_name(8) and len(data["checkpoints"]) == 4
    assert all(c["valid"] for c in data["checkpoints"])
    done = json.loads(cli.invoke(app, [str(out), "--to", "step-6", "--json"]).output)
    assert done["target"]["step"] == 6 and done["moved"] == ["checkpoints/" + ckpt.checkpoint_name(8), "adapter"]
    both = cli.invoke(app, [str(out), "--to", "step-2", "--list"])
    assert isinstance(both.exception, UserError)


def test_the_cli_module_imports_no_torch():
    code = "import sys, swengine.train.rollback_cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
