"""Registers the pytest markers that transformers' test mixins use (the project runs with ``--strict-markers``)."""

import pytest
import torch

HF_MARKERS = (
    "accelerate_tests",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "torch_compile_test",
)


def pytest_configure(config):
    for name in HF_MARKERS:
        config.addinivalue_line("markers", f"{name}: transformers' marker, used by its test mixins")


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """One intra-op thread while these tests run: their models are tiny, and on 2 cores the threads' synchronisation
    costs several times the work (the suites ran 10x slower with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
