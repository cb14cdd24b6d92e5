"""Every kernel variant that the real launches compile (tests/kernels/gpu_compile.py: the
launchers run at the real model shapes, each launch specialised by Triton's own launcher code)
compiles for A100 (sm_80) and H100/H200 (sm_90) without register spills, within the shared
memory, and with 16-byte vector loads wherever its rows are 16-byte aligned. No GPU needed:
Triton compiles to a cubin for the named target and cuobjdump reads its resource usage.
docs/KERNEL_RESOURCES.md is this data as a table (`python -m tests.kernels.gpu_compile --report`)."""
import inspect

import pytest

from .gpu_compile import ARCHS, compile_all_in_child, report

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def compiled():
    return compile_all_in_child()


def _ok(compiled):
    return [r for r in compiled if not isinstance(r, dict)]


def test_every_variant_compiles_for_every_arch(compiled):
    errors = [f"sm_{r['arch']} {r['kernel']}[{r['scenario']}; {r['tag']}]: {r['error']}"
              for r in compiled if isinstance(r, dict)]
    assert not errors, "\n".join(errors)
    variants = {(r.kernel, r.scenario, r.tag) for r in compiled}
    assert len(compiled) == len(variants) * len(ARCHS)


def test_every_kernel_is_launched_by_a_real_shape(compiled):
    # Every @triton.jit kernel (not the helpers they call) appears among the real launches.
    from flowtok_fast.kernels import adaln, attention, flow_step, swiglu

    kernels = {name for mod in (adaln, attention, flow_step, swiglu)
               for name, obj in inspect.getmembers(mod) if name.endswith("_kernel") and hasattr(obj, "fn")}
    assert kernels and kernels == {r.kernel for r in _ok(compiled)}


def test_no_register_spills(compiled):
    for r in _ok(compiled):
        print(r)
        assert r.registers > 0, f"no resource usage read: {r}"
    spills = [str(r) for r in _ok(compiled) if r.spills]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_shared_memory_fits(compiled):
    over = [str(r) for r in _ok(compiled) if r.shared_bytes > SHARED_LIMIT[r.arch]]
    assert not over, "too much shared memory:\n" + "\n".join(over)


def test_16_byte_vector_loads_where_rows_are_aligned(compiled):
    aligned = [r for r in _ok(compiled) if r.rows_aligned]
    assert aligned, "no variant with aligned rows: the check would be empty"
    scalar = [str(r) for r in aligned if r.vec16_ops == 0]
    assert not scalar, "no 16-byte global loads although every row is 16-byte aligned:\n" + "\n".join(scalar)


def test_integer_specialisation_is_the_launchers(compiled):
    # The specialisation comes from the launch values: H = 16 heads is a multiple of 16, H = 20
    # is not; SwiGLU's h = 2048 is, h = 2730 is not. A hand-written signature would miss this.
    div = {(r.kernel, r.scenario): set(r.divisible_by_16) for r in _ok(compiled)}  # one variant each here
    assert "H" in div[("_attn_fwd_kernel", "XL N77 H16 hd72")]
    assert "H" not in div[("_attn_fwd_kernel", "H N77 H20 hd64")]
    assert "H" in div[("_swiglu_fwd_kernel", "N410 h2048")]
    assert "H" not in div[("_swiglu_fwd_kernel", "decoder N410 h2730")]


def test_report_lists_every_variant(compiled):
    text = report([r if isinstance(r, dict) else r.__dict__ for r in compiled])
    for r in _ok(compiled):
        assert f"| `{r.kernel}` | {r.scenario} | {r.tag} |" in text
