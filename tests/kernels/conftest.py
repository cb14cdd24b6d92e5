# The kernel tests build their tensors on the default device. On a GPU machine, run them with
# TRITON_INTERPRET=0 and they exercise the compiled kernels on CUDA; on CPU the interpreter.
# FLOWTOK_KERNEL_SHAPES=real adds the real model shapes (tests/kernels/shapes.py):
#   TRITON_INTERPRET=0 FLOWTOK_KERNEL_SHAPES=real python -m pytest tests/kernels
import os

import pytest
import torch

from . import shapes
from .utils import kernel_device, poisoned_outputs


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs every run (a kernel must be right on any valid input); the seed is
    printed so a failure can be replayed: FLOWTOK_TEST_SEED=<seed> python -m pytest ..."""
    seed = int(os.environ.get("FLOWTOK_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"seed {seed}")
    yield seed


@pytest.fixture(autouse=True)
def _poison_in_real_shape_mode():
    """FLOWTOK_KERNEL_SHAPES=real: every output a kernel allocates starts as NaN in every test
    (the correctness tests poison their kernel calls in any mode)."""
    if not shapes.REAL:
        yield
        return
    with poisoned_outputs():
        yield


@pytest.fixture(autouse=True)
def _kernel_test_device():
    if kernel_device().type != "cuda":
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)
