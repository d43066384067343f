"""Training tests run single-threaded: their tiny matrices gain nothing from a second thread, and on a
shared machine an OpenMP barrier waiting for a descheduled thread made them 10-100x slower."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
