"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and a CI machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
