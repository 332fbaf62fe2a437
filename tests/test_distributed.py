"""Data parallel under torchrun (issue 21): the batch stream's sharding (fast), and real 2-process
gloo runs on CPU through `swengine train --nproc 2` (slow): equal to one process with the same
global batch, resumable across world sizes, and ended with one clear line when a rank dies."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from swengine.data.batches import BatchStream, Row
from swengine.train.distributed import Dist
from swengine.train.launch import torchrun_command, without_nproc
from tests.utils import run_cli

ENV = {"OMP_NUM_THREADS": "1", "SWKERNELS_BACKEND": "torch"}


# ---------------------------------------------------------------- fast: the sharded stream

def _rows(n: int) -> list[Row]:
    return [Row([i, i], [i, i], [0, 1]) for i in range(n)]


def _take(stream: BatchStream, n: int) -> list[list[int]]:
    out = []
    for _ in range(n):
        stream.next()
        out.append(list(stream.last_rows))
    return out


@pytest.mark.parametrize("n_rows, micro, world", [(14, 2, 2), (10, 3, 3), (7, 4, 2)])
def test_ranks_together_see_the_one_process_sequence(n_rows, micro, world):
    rows = _rows(n_rows)
    one = _take(BatchStream(rows, micro, seed=3, pad_id=0), 6 * world)  # crosses epoch boundaries
    ranks = [_take(BatchStream(rows, micro, seed=3, pad_id=0, rank=r, world=world), 6) for r in range(world)]
    assert [ranks[r][i] for i in range(6) for r in range(world)] == one
    assert BatchStream(rows, micro, 3, 0, world=world).batches_per_epoch == math.ceil(math.ceil(n_rows / micro) / world)


def test_position_is_global_and_resumes_under_another_world_size():
    rows = _rows(11)
    two = [BatchStream(rows, 2, seed=1, pad_id=0, rank=r, world=2) for r in range(2)]
    for s in two:
        _take(s, 5)  # 10 micro-batches of the global sequence: into the second epoch
    assert two[0].state_dict() == two[1].state_dict()
    one = BatchStream(rows, 2, seed=1, pad_id=0)
    _take(one, 10)
    assert one.state_dict() == two[0].state_dict()
    resumed = BatchStream(rows, 2, seed=1, pad_id=0)  # 2 ranks' checkpoint, continued by one process
    resumed.load_state_dict(two[0].state_dict())
    three = [BatchStream(rows, 2, seed=1, pad_id=0, rank=r, world=3) for r in range(3)]
    for s in three:
        s.load_state_dict(one.state_dict())
    ahead = _take(one, 6)
    assert _take(resumed, 6) == ahead
    by_three = [_take(s, 2) for s in three]
    assert [by_three[r][i] for i in range(2) for r in range(3)] == ahead


def test_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2"):
        BatchStream(_rows(4), 2, 0, 0, rank=2, world=2)


def test_single_rank_collectives_are_identity():
    d = Dist()
    loss = torch.tensor(1.5)
    assert d.sync_grads([], loss) is loss
    assert d.sum([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    assert d.broadcast_object("x") == "x" and d.main and not d.active


def test_nproc_is_passed_to_torchrun_without_itself():
    assert without_nproc(["train", "--nproc", "2", "a=1", "--nproc=3", "--resume", "auto"]) == \
        ["train", "a=1", "--resume", "auto"]
    cmd = torchrun_command(2, ["train", "x.yaml", "--nproc", "2"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in cmd
    assert cmd[-4:] == ["-m", "swengine", "train", "x.yaml"]


def test_nproc_inside_torchrun_is_refused(monkeypatch, tmp_path):
    from swengine.errors import UserError
    from swengine.train.launch import launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="drop --nproc"):
        launch(2, ["train"])


# ---------------------------------------------------------------- slow: real 2-process runs

def _args(model: Path, data: Path, out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["train", f"model.path={model}", f"data.train={data}", f"output_dir={out}", f"schedule.max_steps={steps}",
            "data.max_seq_len=64", "optim.lr=3e-3", "schedule.warmup_steps=1", "logging.every=1",
            "logging.eval_every=3", "checkpointing.save_every=3", "lora.rank=4", "lora.alpha=8", "lora.dropout=0",
            "data.eval_fraction=0.1", "schedule.micro_batch_size=2", *extra]


def _train(*args: str) -> subprocess.CompletedProcess:
    done = run_cli(*args, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path, atol: float = 1e-6) -> None:
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tiny_llama, tiny_train_data, tmp_path_factory):
    """One process with accumulation 2, and 2 ranks with accumulation 1: the same global batch of 4."""
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    _train(*_args(tiny_llama, tiny_train_data, one, "schedule.grad_accumulation=2"))
    done = _train(*_args(tiny_llama, tiny_train_data, two, "--nproc", "2"))
    return root, one, two, done


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_same_global_batch(runs):
    from swengine.telemetry import read_events

    _, one, two, done = runs
    _assert_same_adapter(one, two)
    assert "data parallel over 2 ranks" in done.stderr
    assert done.stderr.count("trainable LoRA parameters") == 1  # only rank 0 speaks
    events = read_events(two / "metrics.jsonl")
    assert {e["rank"] for e in events} == {0}
    assert events[0]["world_size"] == 2
    losses = [e["loss"] for e in read_events(one / "metrics.jsonl", "train")]
    assert [e["loss"] for e in events if e["event"] == "train"] == pytest.approx(losses, abs=1e-5)


@pytest.mark.slow
def test_checkpoints_resume_across_world_sizes(runs, tiny_llama, tiny_train_data):
    root, one, two, _ = runs
    ckpt_name = "checkpoints/step-00000003"
    # 2 ranks' checkpoint, finished by one process; one process's checkpoint, finished by 2 ranks
    _train(*_args(tiny_llama, tiny_train_data, root / "two-one", "schedule.grad_accumulation=2", "--resume",
                  str(two / ckpt_name)))
    _train(*_args(tiny_llama, tiny_train_data, root / "one-two", "--nproc", "2", "--resume", str(one / ckpt_name)))
    _assert_same_adapter(one, root / "two-one")
    _assert_same_adapter(one, root / "one-two")


@pytest.mark.slow
def test_fsdp_two_ranks_equal_ddp(runs, tiny_llama, tiny_train_data):
    root, one, two, _ = runs
    done = _train(*_args(tiny_llama, tiny_train_data, root / "fsdp", "distributed.strategy=fsdp", "--nproc", "2"))
    _assert_same_adapter(two, root / "fsdp")  # (its step-3 checkpoint was gathered and saved on the way)
    assert "eval loss" in done.stdout


@pytest.mark.slow
def test_sigterm_to_nproc_stops_every_rank_at_one_step_with_a_checkpoint(tiny_llama, tiny_train_data, tmp_path):
    from swengine.train import checkpoint as ckpt

    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    args = _args(tiny_llama, tiny_train_data, out, "checkpointing.save_every=100000", "--nproc", "2", steps=100_000)
    with open(log, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "swengine", *args], env={**os.environ, **ENV},
                                stdout=subprocess.DEVNULL, stderr=err_file)
    try:
        deadline = time.monotonic() + 90
        while "step 3/" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 143, err[-3000:]
    stops = [x for x in err.splitlines() if x.startswith("stopped by SIGTERM")]
    assert len(stops) == 2 and stops[0] == stops[1], stops  # both ranks, the same step
    saved = ckpt.list_checkpoints(out)[-1]  # (after any "best" ones)
    ckpt.verify(saved)
    assert saved.name in stops[0]


def test_fsdp_refuses_the_peft_path():
    from swengine.config import TrainConfig
    from swengine.errors import UserError
    from swengine.train.fsdp import check_supported

    cfg = TrainConfig()
    cfg.quantization.load_in_4bit = True
    check_supported(cfg)  # QLoRA shards (the packed NF4 bytes)
    cfg.lora.impl = "peft"
    with pytest.raises(UserError, match="lora.impl=swkernels"):
        check_supported(cfg)


@pytest.mark.slow
def test_fsdp_shards_an_nf4_base_and_equals_ddp(tiny_llama, tiny_train_data, tmp_path):
    """QLoRA under FSDP2: the packed NF4 bytes are split over the ranks (the run-start line says how
    much each holds) and the adapter equals DDP's over the same NF4 base."""
    nf4 = ("quantization.load_in_4bit=true", "--nproc", "2")
    _train(*_args(tiny_llama, tiny_train_data, tmp_path / "ddp", *nf4, steps=4))
    done = _train(*_args(tiny_llama, tiny_train_data, tmp_path / "fsdp", "distributed.strategy=fsdp", *nf4, steps=4))
    _assert_same_adapter(tmp_path / "ddp", tmp_path / "fsdp")
    line = next(x for x in done.stderr.splitlines() if "FSDP2 over 2 ranks" in x)
    local, full = (float(v) for v in line.split("base weights per rank ")[1].split(" MiB")[0].split(" of "))
    assert local < 0.75 * full


def _rank_pid(mark: str, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` started with SWENGINE_TEST_MARK=mark."""
    want = (f"SWENGINE_TEST_MARK={mark}".encode(), f"LOCAL_RANK={rank}".encode())
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w in env for w in want):
            return int(d.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_the_job_with_one_clear_line(tiny_llama, tiny_train_data, tmp_path):
    mark, out = uuid.uuid4().hex, tmp_path / "run"
    args = _args(tiny_llama, tiny_train_data, out, "distributed.timeout_s=60", "checkpointing.save_every=2",
                 "--nproc", "2", steps=100_000)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "swengine", *args], env={**os.environ, **ENV,
                                "SWENGINE_TEST_MARK": mark}, stdout=subprocess.DEVNULL, stderr=err_file)
    try:
        deadline = time.monotonic() + 90
        while not list((out / "checkpoints").glob("step-*")):  # (pruned as the run goes: any one)
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        pid = _rank_pid(mark, 1)
        assert pid is not None
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
        took = time.monotonic() - killed
        err = log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert took < 30, took  # gloo sees the closed sockets at once; torchrun tears the group down
    line = next(x for x in err.splitlines() if x.startswith("error: rank 0/2"))
    assert "another rank died" in line and "is intact" in line, line
    shutil.rmtree(out, ignore_errors=True)


def test_planner_counts_fsdp_sharded_weights_per_rank():
    from transformers import LlamaConfig

    from swengine.errors import UserError
    from swengine.planner.inventory import inventory
    from swengine.planner.setup import Setup
    from swengine.planner.static import static_bytes

    inv = inventory(LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                                num_key_value_heads=4, vocab_size=32000))
    one, two = (static_bytes(inv, Setup(seq_len=512, shard_world=w)) for w in (1, 2))
    assert two.lora_params == math.ceil(one.lora_params / 2)
    assert two.optimizer_states == math.ceil(one.optimizer_states / 2)
    assert one.base_weights / 2 < two.base_weights < 0.75 * one.base_weights  # + 2 gathered layers, whole head
    with pytest.raises(UserError, match="shard_world"):
        Setup(seq_len=512, shard_world=0)


@pytest.mark.parametrize("override, needle", [("distributed.timeout_s=0", "distributed.timeout_s must be >= 1"),
                                              ("distill.cache=somewhere", "distill.cache is not supported with more"),
                                              ("distributed.strategy=fsdp", "lora.impl=swkernels")])
def test_nproc_checks_the_config_before_starting_torchrun(monkeypatch, override, needle):
    from swengine.errors import UserError
    from swengine.train.cli import check_before_launch

    args = ["model.path=m", "data.train=d", override, "quantization.load_in_4bit=true", "lora.impl=peft"]
    with pytest.raises(UserError, match=needle):
        check_before_launch(args, teacher=None, context=None)
    with pytest.raises(UserError, match="--context is not supported"):
        check_before_launch(["model.path=m"], teacher=None, context=4096)
