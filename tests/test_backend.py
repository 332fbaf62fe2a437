import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from swkernels import _backend
from swkernels._backend import BackendError, force_backend, select_backend


def test_cpu_tensor_runs_triton_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("t", torch.empty(1)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend("t", torch.empty(1)) == "torch"


def test_env_override(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SWKERNELS_BACKEND", "torch")
    assert select_backend("t", torch.empty(1)) == "torch"
    monkeypatch.setenv("SWKERNELS_BACKEND", "triton")
    assert select_backend("t", torch.empty(1)) == "triton"


def test_forcing_triton_on_a_plain_cpu_tensor_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("SWKERNELS_BACKEND", "triton")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        select_backend("t", torch.empty(1))


def test_invalid_env_value(monkeypatch):
    monkeypatch.setenv("SWKERNELS_BACKEND", "cuda")
    with pytest.raises(BackendError, match="one of: triton, torch, auto"):
        select_backend("t", torch.empty(1))


def test_force_backend_context_beats_env_and_restores(monkeypatch):
    monkeypatch.setenv("SWKERNELS_BACKEND", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with FakeTensorMode():
        fake = torch.empty(4)
    with force_backend("triton"):
        assert select_backend("t", fake) == "triton"  # fake tensors: the fake impl runs
    assert select_backend("t", fake) == "torch"


def test_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_announced", set())
    with caplog.at_level("INFO", logger="swkernels"):
        select_backend("op_a", torch.empty(1))
        select_backend("op_a", torch.empty(1))
    assert [r.getMessage() for r in caplog.records] == [
        "swkernels.op_a runs on the torch backend (no CUDA tensor and TRITON_INTERPRET unset)"
    ]


@pytest.mark.gpu
def test_cuda_tensor_runs_triton():
    assert select_backend("t", torch.empty(1, device="cuda")) == "triton"
