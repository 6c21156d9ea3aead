"""One torch thread in these tests (session-wide, so module fixtures get it too): on a shared 2-core machine two threads spin against other
processes and a tiny model's step takes 20x longer."""

import pytest
import torch

from tests.sft.common import train_chat_tokenizer


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory):
    return train_chat_tokenizer(tmp_path_factory.mktemp("chat_tokenizer") / "tok")
