import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The synthetic runs are small batched programs: one intra-op thread is faster and reproducible."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
