"""manifest.json: what a package was built for, and the checks that refuse a mismatch.

A package is a directory: text.pt2, flow.pt2, decode.pt2 and manifest.json (written last, so a
directory without it is not a package). Every refusal is a one-line UserError naming the field,
the package's value and the expected one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from flowtok_fast.errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"
STAGES = ("text", "flow", "decode")


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("flowtok_fast")
    except Exception:  # not installed (a source tree on sys.path)
        return "unknown"


def weights_hash(*modules: torch.nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: the identity of the source model."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous().reshape(-1)  # 0-dim tensors too
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_dict(config) -> dict:
    return dataclasses.asdict(config)


def write(directory: Path, manifest: dict) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST)


def read(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"package {str(directory)!r}: not a directory (expected a package from `flowtok-fast export`)")
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"package {str(directory)!r}: no {MANIFEST} (an interrupted or incomplete export?): export it again")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{path}: format {found!r}, expected {FORMAT} (a package from this flowtok-fast)")
    return manifest


def check_files(directory: Path, manifest: dict) -> None:
    """Each stage file present, of the recorded size and sha256 (catches truncation and corruption
    before the loader meets them)."""
    for stage in STAGES:
        entry = manifest["files"][stage]
        path = directory / entry["name"]
        if not path.is_file():
            raise UserError(f"package {str(directory)!r}: {entry['name']} is missing (expected the {stage} stage)")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise UserError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced): export it again")
        if file_sha256(path) != entry["sha256"]:
            raise UserError(f"{path}: sha256 differs from the manifest's (corrupted): export it again")


def expect(manifest: dict, field: str, wanted, label: str | None = None) -> None:
    found = manifest.get(field)
    if wanted is not None and found != wanted:
        raise UserError(f"package built for {label or field} {found!r}, expected {wanted!r}: export one for {wanted!r}")


def check_runtime(manifest: dict, device: torch.device) -> None:
    """The torch version (AOTInductor packages are tied to the torch that compiled them) and the device."""
    if manifest["torch"] != torch.__version__:
        raise UserError(f"package built with torch {manifest['torch']}, this is torch {torch.__version__}: "
                        "export it again with this torch")
    built = torch.device(manifest["device"])
    if built.type != device.type:
        raise UserError(f"package built for device {manifest['device']!r}, expected {str(device)!r}: "
                        f"export one with --device {device.type}")
    if built.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"package built for device {manifest['device']!r}, but CUDA is not available here")
    if built.type == "cpu":
        check_cpu(manifest)


# ---------------------------------------------------------------- CPU features
# Inductor compiles a package's C++ with -march=native (every instruction set of the CPU it runs on,
# -mavx512bf16 included where present): on a CPU without those instructions the program would die
# of SIGILL mid-run. So the manifest records
# the build CPU's instruction-set flags, and a CPU that lacks any of them is refused at load, in one
# line. Linux reads them from /proc/cpuinfo; elsewhere torch's own probes name the few that matter.

ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "amx", "gfni", "vaes", "vpclmulqdq", "sha_ni", "adx",
                "movbe", "popcnt", "abm", "lzcnt", "sve", "asimd", "bf16", "i8mm")
# cpuinfo name -> torch.cpu probe (all in torch 2.11 and 2.14; a missing probe reads as unknown)
CPU_PROBES = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
NATIVE_BF16 = ("avx512_bf16", "amx_tile", "amx_bf16")


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_features() -> set[str]:
    """The instruction-set flags of this CPU (cpuinfo names), torch's probes included."""
    info = _cpuinfo()
    found = {f for f in (info.get("flags") or info.get("Features") or "").split() if f.startswith(ISA_PREFIXES)}
    for name, probe in CPU_PROBES.items():
        check = getattr(torch.cpu, probe, None)
        if check is not None:
            (found.add if check() else found.discard)(name)
    return found


def cpu_build_entry() -> dict:
    """The manifest's "cpu": what a CPU needs to run the package (the build CPU's instruction sets)."""
    info = _cpuinfo()
    import platform

    return {"model": info.get("model name") or platform.processor() or "unknown",
            "capability": torch.backends.cpu.get_cpu_capability(), "requires": sorted(cpu_features())}


def check_cpu(manifest: dict) -> None:
    """Refuses a CPU that lacks an instruction set the package was built with (packages from before
    this entry carry no "cpu" and are not checked)."""
    built = manifest.get("cpu")
    if not isinstance(built, dict):
        return
    missing = sorted(set(built.get("requires", ())) - cpu_features())
    if missing:
        bf16 = [f for f in missing if f in NATIVE_BF16]
        hint = " (a bf16 package needs native bf16: or export with --dtype fp32)" if bf16 and manifest.get("dtype") == "bf16" else ""
        raise UserError(f"package built on a CPU with {', '.join(missing)} ({built.get('model', '?')}, Inductor compiles "
                        f"for the build CPU), this CPU lacks them: export the package on this machine{hint}")
