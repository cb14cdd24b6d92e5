"""pytest plugin (``-p tests.kernels.fake_cuda_default``): runs kernel tests as on a GPU machine,
without one. ``meta`` plays CUDA: it is the default device, ``torch.cuda.is_available()`` answers
True, and the kernels' device check accepts meta tensors as it accepts CUDA ones (nothing is
launched on them: only tests that fail or stop before a launch can run under this). A test that
builds its tensors on the default device and then assumes they are CPU tensors fails here as it
does on a GPU machine; test_cuda_default_device.py picks the tests."""
import pytest
import torch

from flowtok_fast.kernels import adaln, attention, flow_step, swiglu


def _meta_as_cuda(check):
    def check_device(*tensors, op):
        check(*[t for t in tensors if t is None or t.device.type != "meta"], op=op)
    return check_device


@pytest.fixture(autouse=True)
def _fake_cuda_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for module in (adaln, attention, flow_step, swiglu):
        monkeypatch.setattr(module, "check_device", _meta_as_cuda(module.check_device))
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
