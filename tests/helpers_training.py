"""What the training, prediction, evaluation, calibration and dataset tests share: torch on one thread.

Their tensors are tiny (batches of 1-24 images of 32-72 px): a second intra-op thread has nothing to share but
its waits, and on a 2-core machine with anything else running those waits cost 2-10x the time (measured here:
test_training.py without its kill-and-resume tests 25 s on one thread, 76-89 s on two; one kill-and-resume
process ~4 s against 10-15 s). Import the fixture into a test file (`from tests.helpers_training import
one_thread  # noqa: F401`) and it applies to that file's tests, autouse."""
import os

import pytest


def one_thread_env():
    """The environment of a subprocess that should compute on one thread too (torch reads it at start-up)."""
    return dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch on one intra-op thread for the tests of the module that imports this; put back afterwards."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
