"""The circuit breaker in the training loop (issue 18), through the CLI on CPU: an injected NaN
rolls back to the last good checkpoint and the run finishes; an out-of-memory error leaves the
last checkpoint loadable; --on-alert gets the trips."""

import json

import torch

from swengine.telemetry import read_events
from swengine.train import checkpoint as ckpt
from tests.utils import run_main


def run(capsys, argv):
    return run_main(capsys, argv)


def args(model, data, out, *extra):
    return ["train", f"model.path={model}", f"data.train={data}", f"output_dir={out}", "schedule.max_steps=8",
            "schedule.micro_batch_size=2", "data.max_seq_len=64", "logging.every=1", "logging.eval_every=0",
            "checkpointing.save_every=2", *extra]


def inject(monkeypatch, at_calls: set[int], make):
    """forward_backward's n-th call (1-based, one per step here) returns make(real result) instead."""
    import swengine.train.trainer as trainer

    real, calls = trainer.forward_backward, [0]

    def hooked(*a, **k):
        calls[0] += 1
        out = real(*a, **k)
        return make(out) if calls[0] in at_calls else out

    monkeypatch.setattr(trainer, "forward_backward", hooked)


def test_a_nan_step_rolls_back_to_the_last_good_checkpoint_and_the_run_finishes(tiny_llama, tiny_train_data, tmp_path,
                                                                                capsys, monkeypatch):
    inject(monkeypatch, {5}, lambda loss: loss * float("nan"))  # step 5 (after the step-4 checkpoint)
    alerts = tmp_path / "alerts.jsonl"
    out = tmp_path / "run"
    code, _, err = run(capsys, args(tiny_llama, tiny_train_data, out, "--on-alert", f"cat >> {alerts}; echo >> {alerts}"))
    assert code == 0, err
    assert "breaker: loss is nan at step 5" in err and "rolled back to step-00000004" in err
    trips = read_events(out / "metrics.jsonl", "breaker")
    assert [(t["rule"], t["action"], t["step"]) for t in trips] == [("nonfinite", "rollback", 5)]
    steps = [e["step"] for e in read_events(out / "metrics.jsonl", "train")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # the NaN step was undone (its breaker event says so), then redone
    losses = [e["loss"] for e in read_events(out / "metrics.jsonl", "train")]
    assert all(isinstance(x, float) for x in losses)  # all finite: nothing of the NaN step was kept
    final = ckpt.read_state(ckpt.list_checkpoints(out)[-1])
    assert final["step"] == 8 and final["breaker"]["rollbacks"] == 1
    sent = [json.loads(line) for line in alerts.read_text().splitlines() if line.strip()]
    assert sent and sent[0]["rule"] == "nonfinite" and sent[0]["step"] == 5


def test_nan_on_every_step_stops_after_the_bounded_retries(tiny_llama, tiny_train_data, tmp_path, capsys,
                                                           monkeypatch):
    inject(monkeypatch, set(range(5, 100)), lambda loss: loss * float("nan"))
    code, _, err = run(capsys, args(tiny_llama, tiny_train_data, tmp_path / "run", "safety.max_rollbacks=2"))
    assert code == 3 and "Traceback" not in err
    trips = read_events(tmp_path / "run" / "metrics.jsonl", "breaker")
    assert [t["action"] for t in trips] == ["rollback", "rollback", "stop"]


def test_an_out_of_memory_error_leaves_the_last_checkpoint_loadable(tiny_llama, tiny_train_data, tmp_path, capsys,
                                                                    monkeypatch):
    def oom(_loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    inject(monkeypatch, {5}, oom)
    out = tmp_path / "run"
    code, _, err = run(capsys, args(tiny_llama, tiny_train_data, out))
    assert code == 3 and "error: out of GPU memory at step 5" in err and "micro_batch_size" in err
    last = ckpt.list_checkpoints(out)[-1]
    ckpt.verify(last)
    assert ckpt.read_state(last)["step"] == 4
    monkeypatch.undo()
    code, _, err = run(capsys, args(tiny_llama, tiny_train_data, out, "--resume", "auto"))
    assert code == 0 and "resumed from" in err and "at step 4" in err
