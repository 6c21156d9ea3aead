import pytest
import torch

from tests.model.tiny_tokenizers import train_sentencepiece


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~100x faster on one thread than on two contended ones (OpenMP spin-waits)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))
