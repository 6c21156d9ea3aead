import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~100x faster on one thread than on two contended ones (OpenMP spin-waits)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
