"""In-place Euler / CFG-Euler sampler step (kernels/flow_step.py) against its reference.

Error rule: the kernel's error against an fp64 computation stays within 2x the error of the
same-precision PyTorch reference plus a small atol. Inputs are fresh each run (the seed is
printed, so pytest shows it on failure).
"""

import pytest
import torch

from flowtok_fast.kernels import flow_step as fs
from .shapes import real
from .utils import assert_within_ref_error, poisoned_outputs

F32, BF16 = torch.float32, torch.bfloat16


def _scalar(value: float, as_tensor: bool, dtype=torch.float32):
    return torch.tensor(value, dtype=dtype) if as_tensor else value


def _exact_cfg(x, v, dt, s):
    B = x.shape[0]
    v = v.double()
    return x.double() + float(dt) * (v[B:] + float(s) * (v[:B] - v[B:]))


@pytest.mark.parametrize("scale_tensor", [False, True], ids=["scale_float", "scale_tensor"])
@pytest.mark.parametrize("dt_tensor", [False, True], ids=["dt_float", "dt_tensor"])
@pytest.mark.parametrize("x_dtype,v_dtype,B", [(F32, F32, 3), (F32, BF16, 1), (BF16, BF16, 3)]
                         + real([(F32, BF16, 64), (F32, F32, 64)]),
                         ids=["fp32", "fp32_vbf16", "bf16"] + real(["fp32_vbf16_B64", "fp32_B64"]))
def test_cfg_euler_step(x_dtype, v_dtype, B, dt_tensor, scale_tensor):
    dt_val, s_val = (1 - 1e-5) / 20, 2.0
    # dt as an fp64 tensor checks the in-kernel cast; scale as fp32.
    dt = _scalar(dt_val, dt_tensor, torch.float64)
    scale = _scalar(s_val, scale_tensor)
    x0 = torch.randn(B, 77, 16).to(x_dtype)
    v = (3.0 * torch.randn(2 * B, 77, 16)).to(v_dtype)
    v_before = v.clone()

    x = x0.clone()
    ptr = x.data_ptr()
    with poisoned_outputs():
        assert fs.cfg_euler_step_(x, v, dt, scale) is None
    assert x.data_ptr() == ptr and x.dtype == x_dtype
    assert torch.equal(v, v_before), "v was modified"
    assert not torch.equal(x, x0), "x was not updated"

    ref = fs.cfg_euler_step_ref(x0.clone(), v, dt, scale)
    assert ref.dtype == x_dtype
    exact = _exact_cfg(x0, v, dt_val, s_val)
    assert_within_ref_error(x, ref, exact, name="x")
    # The update itself (small next to x) within the same rule, in fp32 only.
    if x_dtype == F32:
        assert_within_ref_error(x - x0, ref - x0, exact - x0.double(), name="x - x0")


@pytest.mark.parametrize("dt_tensor", [False, True], ids=["dt_float", "dt_tensor"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_euler_step(dtype, dt_tensor):
    x0, v = torch.randn(3, 77, 16).to(dtype), torch.randn(3, 77, 16).to(dtype)
    v_before = v.clone()
    x = x0.clone()
    fs.euler_step_(x, v, _scalar(0.05, dt_tensor))
    assert torch.equal(v, v_before) and not torch.equal(x, x0)
    exact = x0.double() + 0.05 * v.double()
    assert_within_ref_error(x, fs.euler_step_ref(x0.clone(), v, 0.05), exact, name="x")


def test_cfg_formula_and_branch_order():
    # Exact small numbers: v_c = 1 (first half), v_u = 3 (second half); s = 2, dt = 0.5:
    # x += 0.5 * (3 + 2 * (1 - 3)) = -0.5. Swapped halves would give +2.5.
    x = torch.zeros(2, 77, 16)
    v = torch.cat([torch.ones(2, 77, 16), torch.full((2, 77, 16), 3.0)])
    fs.cfg_euler_step_(x, v, 0.5, torch.tensor(2.0))
    assert torch.equal(x, torch.full_like(x, -0.5))


def test_noncontiguous_x_is_updated_in_place():
    base = torch.randn(2, 77, 32)
    x = base[:, :, :16]  # a strided view
    other = base[:, :, 16:].clone()
    x0 = x.clone()
    v = torch.randn(4, 77, 16)
    fs.cfg_euler_step_(x, v, 0.1, 1.5)
    assert torch.equal(base[:, :, 16:], other), "elements outside x were touched"
    exact = _exact_cfg(x0, v, 0.1, 1.5)
    assert_within_ref_error(base[:, :, :16], fs.cfg_euler_step_ref(x0.clone(), v, 0.1, 1.5), exact)


def test_tensor_scalars_are_read_at_call_time():
    # The same dt / scale tensors, changed in place between calls (as a CUDA-graph sampler does).
    x, v = torch.zeros(1, 77, 16), torch.ones(2, 77, 16)
    v[1:] = 0.0  # v_c = 1, v_u = 0 -> guided velocity = s
    dt, scale = torch.tensor(0.25), torch.tensor(2.0)
    fs.cfg_euler_step_(x, v, dt, scale)
    dt.fill_(0.5)
    scale.fill_(4.0)
    fs.cfg_euler_step_(x, v, dt, scale)
    assert torch.equal(x, torch.full_like(x, 0.25 * 2.0 + 0.5 * 4.0))


def test_torch_compile_fullgraph_matches_eager():
    def sample(x, v, dt, scale):
        for _ in range(2):
            fs.cfg_euler_step_(x, v, dt, scale)
            fs.euler_step_(x, v[: x.shape[0]], 0.01)
        return x

    compiled = torch.compile(sample, fullgraph=True, backend="aot_eager")
    x, v = torch.randn(2, 77, 16), torch.randn(4, 77, 16)
    dt, scale = torch.tensor(0.05), torch.tensor(2.0)
    x_eager, x_comp = x.clone(), x.clone()
    with torch.no_grad():
        sample(x_eager, v, dt, scale)
        out = compiled(x_comp, v, dt, scale)
    assert not torch.equal(x_comp, x), "compiled step did not update x"
    torch.testing.assert_close(x_comp, x_eager)
    torch.testing.assert_close(out, x_eager)


def test_bad_inputs():
    x, v = torch.randn(2, 77, 16), torch.randn(4, 77, 16)
    with pytest.raises(ValueError, match=r"v of shape \[4, 77, 16\] .*got \[2, 77, 16\]"):
        fs.cfg_euler_step_(x, v[:2], 0.1, 2.0)
    with pytest.raises(ValueError, match=r"v of shape \[2, 77, 16\] .*got \[4, 77, 16\]"):
        fs.euler_step_(x, v, 0.1)
    with pytest.raises(ValueError, match=r"dt as a float or a 0-dim tensor, got shape \[2\]"):
        fs.cfg_euler_step_(x, v, torch.tensor([0.1, 0.2]), 2.0)
    # A scale tensor on another device than x (x is on the default device: CUDA on a GPU machine)
    other = "meta" if x.device.type != "meta" else "cpu"
    with pytest.raises(ValueError, match=rf"scale on {x.device} \(no host sync\), got {other}"):
        fs.cfg_euler_step_(x, v, 0.1, torch.tensor(2.0, device=other))
    with pytest.raises(ValueError, match=r"scale of a floating dtype, got torch.int64"):
        fs.cfg_euler_step_(x, v, 0.1, torch.tensor(2))
    with pytest.raises(ValueError, match=r"dt as a float or a 0-dim tensor, got str"):
        fs.euler_step_(x, v[:2], "0.1")
    with pytest.raises(ValueError, match=r"x of dtype .*got torch.int32"):
        fs.euler_step_(x.int(), v[:2], 0.1)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    # Explicitly on the CPU: on a GPU machine the kernel tests' default device is CUDA.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors \(got cpu\)"):
        fs.euler_step_(torch.zeros(1, 77, 16, device="cpu"), torch.zeros(1, 77, 16, device="cpu"), 0.1)
