"""Test setup: without CUDA, Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before swkernels
is imported, so it happens here, at conftest import.
"""

import atexit
import os
import shutil
import tempfile

import torch

HAS_CUDA = torch.cuda.is_available()
# tokenised data is cached (data.cache_dir's default): in a folder of this session's, never ~/.cache
os.environ["SWENGINE_CACHE"] = tempfile.mkdtemp(prefix="swengine-test-cache-")
atexit.register(shutil.rmtree, os.environ["SWENGINE_CACHE"], True)
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU when present, else the CPU (Triton interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_runtest_logreport(report):
    """SWENGINE_TEST_LOG=path: one line per test outcome, failures with their traceback, written
    as they happen (a run cut off by a time limit, e.g. on a leased GPU, still tells what failed)."""
    path = os.environ.get("SWENGINE_TEST_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER") or (report.when != "call" and report.passed):
        return
    with open(path, "a") as f:
        f.write(f"{report.outcome.upper()} {report.when} {report.nodeid} {report.duration:.2f}s\n")
        if report.failed:
            f.write(str(report.longrepr)[-4000:] + "\n----\n")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama directory (with the demo tokenizer), built once per session."""
    from tests.utils import make_model

    return make_model(tmp_path_factory.mktemp("models"), "llama")


@pytest.fixture(scope="session")
def tiny_train_data(tmp_path_factory):
    """The first 60 rows of the demo's training set, as a jsonl file."""
    from swengine.model.load import DEMO_TRAIN

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:60]) + "\n")
    return path
