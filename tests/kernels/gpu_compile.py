"""Compile every kernel for a real GPU target (no GPU needed) and read its resource usage.

@triton.jit picks interpreter or compiler at import, and the tests import the kernels under
TRITON_INTERPRET=1. So compilation runs in a child process started with TRITON_INTERPRET=0:
`python -m tests.kernels.gpu_compile` prints one JSON line per (kernel config, arch).
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

KERNEL_MODULES = ("attention", "adaln", "swiglu", "flow_step")
ARCHS = (80, 90)


@dataclass
class Resources:
    module: str
    name: str
    arch: int
    registers: int
    shared_bytes: int
    stack_bytes: int
    local_bytes: int

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0

    def __str__(self) -> str:
        return (f"sm_{self.arch} {self.module}:{self.name}: REG {self.registers}, SHARED {self.shared_bytes} B, "
                f"STACK {self.stack_bytes}, LOCAL {self.local_bytes}")


def kernel_configs():
    """(module name, config dict) for every launch configuration the kernel files declare."""
    for mod in KERNEL_MODULES:
        for cfg in importlib.import_module(f"flowtok_fast.kernels.{mod}").gpu_compile_configs():
            yield mod, cfg


def compile_for(module: str, cfg: dict, arch: int) -> Resources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=cfg["fn"], signature=cfg["signature"], constexprs=cfg.get("constexprs", {}))
    options = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    field = lambda key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", usage)) else -1  # noqa: E731
    # Triton allocates shared memory dynamically: cuobjdump's SHARED is only the static part
    shared = max(field("SHARED"), int(getattr(compiled.metadata, "shared", 0) or 0))
    return Resources(module, cfg["name"], arch, field("REG"), shared, field("STACK"), field("LOCAL"))


def compile_all_in_child() -> dict:
    """{(module, name, arch): Resources or error string}, compiled by a non-interpreting child."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_compile"], capture_output=True, text=True,
                          env=env, cwd=root, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"GPU compile child failed:\n{proc.stderr[-4000:]}")
    out = {}
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        key = (rec["module"], rec["name"], rec["arch"])
        out[key] = rec["error"] if "error" in rec else Resources(**rec)
    return out


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") == "0", "run with TRITON_INTERPRET=0"
    for module, cfg in kernel_configs():
        for arch in ARCHS:
            try:
                print(json.dumps(asdict(compile_for(module, cfg, arch))), flush=True)
            except Exception as err:  # reported per config by the test
                print(json.dumps({"module": module, "name": cfg["name"], "arch": arch, "error": repr(err)[:2000]}), flush=True)
