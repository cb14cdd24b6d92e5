"""Run only by test_cuda_default_device.py, under tests/kernels/fake_cuda_default.py: fails
unless the fake is in force, so the child run cannot pass with the fake silently missing."""
import torch


def test_default_device_is_not_the_cpu():
    assert torch.empty(1).device.type != "cpu" and torch.cuda.is_available()
