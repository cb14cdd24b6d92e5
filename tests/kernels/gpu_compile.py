"""Compile a Triton kernel for a real GPU target (no GPU needed) and read its resource usage."""
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass
class Resources:
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
        return (f"sm_{self.arch} {self.name}: REG {self.registers}, SHARED {self.shared_bytes} B, "
                f"STACK {self.stack_bytes}, LOCAL {self.local_bytes}")


def _jit_function(fn):
    # Under TRITON_INTERPRET=1 @triton.jit gives an interpreter wrapper; compile from its source.
    if isinstance(fn, JITFunction):
        return fn
    return JITFunction(getattr(fn, "fn", fn))


def compile_for(cfg: dict, arch: int) -> Resources:
    fn = _jit_function(cfg["fn"])
    src = ASTSource(fn=fn, signature=cfg["signature"], constexprs=cfg.get("constexprs", {}))
    options = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    field = lambda key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", usage)) else 0  # noqa: E731
    return Resources(cfg["name"], arch, field("REG"), field("SHARED"), field("STACK"), field("LOCAL"))
