"""Every kernel compiles for A100 (sm_80) and H100 (sm_90) at the configurations the XL/H
generator and the 256/512 px decoder use, without register spills. No GPU needed: Triton
compiles to a cubin for the named target and cuobjdump reads its resource usage."""
import importlib

import pytest

from tests.kernels.gpu_compile import compile_for

KERNEL_MODULES = ("attention", "adaln", "swiglu", "flow_step")


def _configs():
    out = []
    for mod in KERNEL_MODULES:
        for cfg in importlib.import_module(f"flowtok_fast.kernels.{mod}").gpu_compile_configs():
            out.append(pytest.param(cfg, id=f"{mod}:{cfg['name']}"))
    return out


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("cfg", _configs())
def test_compiles_without_spills(cfg, arch):
    res = compile_for(cfg, arch)
    print(res)
    assert res.registers > 0, f"no resource usage read for {res.name}"
    assert not res.spills, f"register spills: {res}"
    assert res.shared_bytes <= (227 if arch == 90 else 163) * 1024, f"too much shared memory: {res}"
