"""Test setup: Triton kernels run under the interpreter on machines without CUDA."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The engine's compile cache stays off unless a test turns it on (compile_cache_dir=...), so that
# tests counting compilations do not depend on which engines earlier tests built.
os.environ.setdefault("INFER_COMPILE_CACHE_DIR", "")

sys.path.insert(0, os.path.dirname(__file__))  # shared helpers such as tiny_hf

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
