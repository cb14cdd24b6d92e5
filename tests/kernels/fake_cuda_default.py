"""pytest plugin (``-p tests.kernels.fake_cuda_default``): runs kernel tests as on a GPU machine,
without one. ``torch.cuda.is_available()`` answers True and the default device is ``meta``, a
device that is not the CPU: a test that builds its tensors on the default device and then
assumes they are CPU tensors fails here as it does on a GPU machine, where the kernel tests'
default device is CUDA. Only tests that launch no kernel on default-device tensors can run
under it (nothing computes on meta); test_cuda_default_device.py picks them."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _fake_cuda_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
