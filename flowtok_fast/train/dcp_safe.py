"""Reading torch.distributed.checkpoint (DCP) directories without unrestricted unpickling.

DCP's FileSystemReader unpickles `.metadata` with plain `pickle.load`, and its default planner
loads non-tensor entries (optimizer hyper-parameters) with `torch.load(weights_only=False)`:
a checkpoint directory someone else could write would run their code on resume. Here the
metadata goes through an unpickler that admits only DCP's metadata dataclasses, torch.Size,
torch dtypes / layouts / memory formats and paths, and the non-tensor entries through
`torch.load(weights_only=True)`. Every failure is a CheckpointError (a UserError) in one line
that names the file; torch's "re-run with weights_only=False" advice is never passed on.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import default_planner as _planner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from flowtok_fast.checkpoint import CheckpointError

METADATA_FILE = ".metadata"

_PATHS = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}
# module -> names: DCP's metadata classes (torch 2.11 and 2.14 hold the same ones), its storage
# record, the layout decoder torch itself allows in weights_only loads, and path objects
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": _PATHS,
    "pathlib._local": _PATHS,  # Python 3.13
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (a function, a class with side effects) is refused."""

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_metadata(path: str | Path) -> Metadata:
    """The Metadata of a DCP `.metadata` file, through MetadataUnpickler."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            metadata = MetadataUnpickler(f).load()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint metadata ({err.strerror or err})") from err
    except Exception as err:  # noqa: BLE001 - whatever a damaged or crafted file raises
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a valid training checkpoint metadata file ({reason}); nothing was loaded") from err
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: not a training checkpoint metadata file (holds {type(metadata).__name__})")
    return metadata


def check_complete(directory: str | Path, metadata: Metadata) -> None:
    """Every byte range the metadata points at exists: catches truncated or missing data files
    before any tensor is touched."""
    directory = Path(directory)
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{directory / METADATA_FILE}: points at a data file outside the checkpoint ({rel!r})")
        ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in ends.items():
        f = directory / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {METADATA_FILE}); the checkpoint is incomplete")
        if f.stat().st_size < end:
            raise CheckpointError(f"{f}: truncated ({f.stat().st_size} bytes, {METADATA_FILE} needs {end})")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata comes from read_metadata (tensor data is already read with
    torch.load(weights_only=True) by DCP)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        metadata = read_metadata(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        if hasattr(self, "load_id"):
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(_planner.DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries load with weights_only=True."""

    def __init__(self, directory: str | Path, **kw):
        super().__init__(**kw)
        self.directory = Path(directory)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{self.directory}: entry '{fqn}' is not plain data ({short_reason(err)})") from err
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what the default planner uses

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def innermost(err: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException ({rank: (exception, trace)})."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return innermost(inner[0] if isinstance(inner, tuple) else inner)
    return err


def short_reason(err: BaseException) -> str:
    """One line about an exception, without torch's weights_only advice or DCP's tracebacks."""
    err = innermost(err)
    if isinstance(err, CheckpointError):
        return str(err)
    text = str(err)
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            return f"refused global {found.group(1)}"
        after = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else ""
        detail = next((ln.strip() for ln in after.splitlines() if ln.strip()), "")
        return "not a plain-data pickle" + (f": {detail}" if detail else "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
