"""Fixtures several test files share (pytest finds this file for every test in the folder).

Constants and functions they share are in ``helpers.py``.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch's intra-op threads set to one while a module's tests run, restored after; a file that trains or
    evaluates networks in-process takes it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` (a
    module-scoped fixture that trains asks for it by name, to be set up after it).

    The suite shares two cores with other processes: with two OpenMP threads a contended core makes every convolution
    wait (tests/test_engines.py measured iterations 10-50x slower; a tiny synthesis training run of
    tests/test_bad_training_inputs.py took 40 s instead of 4 s). scripts/test.sh already gives each pytest process one
    thread (``OMP_NUM_THREADS=1``); this counts where a file is run by itself.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
