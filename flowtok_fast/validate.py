"""Checks of user input made before any model is loaded or sampled: numbers in range (and the
limits every verb shares), device strings, prompts, prompt files and output paths. Each failure is
a UserError naming the option or file, what was found and what was expected."""
from __future__ import annotations

import math
import numbers
import os
import tempfile
import warnings
from pathlib import Path

from flowtok_fast.errors import UserError


def positive_int(value, name: str) -> int:
    return _int_at_least(value, name, 1)


def nonneg_int(value, name: str) -> int:
    return _int_at_least(value, name, 0)


def _int_at_least(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value}")
    return int(value)


def finite_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def one_of(value, choices, name: str):
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}: expected one of {', '.join(map(str, choices))}")
    return value


# ---------------------------------------------------------------- limits, and argparse types that hold them

# One set for every verb (the server caps steps and guidance the same way): time or memory grows
# with each, so a value beyond its limit is a typo, refused before any model is loaded.
MAX_STEPS = 500  # sampling steps (the time grid and the run grow with them)
MAX_ABS_CFG = 100.0  # |guidance scale|
MAX_BATCH = 1024  # images per forward batch or exported package (activations grow with it)
MAX_IMAGES = 1024  # images one command holds: generate's prompts (one grid), example shapes --images


def int_arg(low: int = 1, high: int | None = None):
    """An argparse type: an integer in [low, high] (no upper limit when high is None)."""
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return _arg(int, lambda v: v >= low and (high is None or v <= high), expected)


def float_arg(low: float, high: float):
    """An argparse type: a finite number in [low, high]."""
    return _arg(float, lambda v: math.isfinite(v) and low <= v <= high, f"a finite number in [{low:g}, {high:g}]")


def _arg(kind, ok, expected: str):
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


# add_argument keywords: `p.add_argument("--steps", **STEPS, default=..., help=...)`; --help shows the range
STEPS = dict(type=int_arg(1, MAX_STEPS), metavar=f"1..{MAX_STEPS}")
BATCH = dict(type=int_arg(1, MAX_BATCH), metavar=f"1..{MAX_BATCH}")
CFG = dict(type=float_arg(-MAX_ABS_CFG, MAX_ABS_CFG), metavar=f"-{MAX_ABS_CFG:g}..{MAX_ABS_CFG:g}")
IMAGES = dict(type=int_arg(1, MAX_IMAGES), metavar=f"1..{MAX_IMAGES}")
COUNT = dict(type=int_arg(1))  # threads, shard sizes: >= 1, no upper limit


def check_fused_kernels(device, option: str) -> None:
    """The Triton kernels run on CUDA; on a CPU only in Triton's interpreter (TRITON_INTERPRET=1,
    read when the kernels are imported: for testing them, slowly)."""
    import torch

    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"{option} needs CUDA (this run is on {device}): leave it out to run the reference ops, or "
                        "start with TRITON_INTERPRET=1 to test the kernels in Triton's interpreter (slow)")


# ---------------------------------------------------------------- devices

SUPPORTED_DEVICES = ("cpu", "cuda")


def resolve_device(device):
    """None -> cuda when available else cpu; otherwise a checked torch.device (cpu, cuda, cuda:N)."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device {device!r} is not a device string: expected cpu, cuda or cuda:N") from None
    if d.type not in SUPPORTED_DEVICES:
        raise UserError(f"device {device!r} is not supported: expected cpu, cuda or cuda:N")
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda} but no GPU is visible"
            raise UserError(f"device {device!r}: CUDA is not available (torch {torch.__version__} built {built}); "
                            "use --device cpu")
        if d.index is not None and d.index >= count:
            raise UserError(f"device {device!r}: there are {count} CUDA device(s), numbered 0..{count - 1}")
    return d


# ---------------------------------------------------------------- prompts


def check_prompts(prompts) -> list[str]:
    """A string or a non-empty list of strings -> a list of strings."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise UserError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise UserError("no prompts given: expected at least one prompt string")
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        i, kind = bad[0]
        raise UserError(f"prompts must be strings: prompt {i} is a {kind} ({len(bad)} non-string prompt(s) in all)")
    return list(prompts)


def read_prompt_file(path: str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompt-file {path}: {'is a directory' if p.is_dir() else 'no such file'}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"--prompt-file {path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}): "
                        "expected one prompt per line, UTF-8 encoded") from None
    if "\x00" in text:
        raise UserError(f"--prompt-file {path}: holds NUL bytes (a binary file?): expected one prompt per line, "
                        "UTF-8 encoded")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompt-file {path}: no prompts in it (every line is empty)")
    return prompts


def read_json(path: str, what: str):
    """A JSON file's content; a missing file, bad encoding or a syntax error is named with the file."""
    import json

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file {path}: {'is a directory' if p.is_dir() else 'no such file'}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what} file {path} is not UTF-8 text: expected JSON") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{what} file {path} is not valid JSON: line {err.lineno} column {err.colno}: {err.msg}") from None


# ---------------------------------------------------------------- output images


def image_output_format(path: str, option: str = "--out") -> str:
    """Check that an image can be written at `path` (before any sampling) and return the PIL
    format its extension names. The parent directory may not exist yet: it is created later."""
    from PIL import Image

    Image.init()
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} {path} is a directory: expected an image file name such as {p / 'grid.png'}")
    ext = p.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise UserError(f"{option} {path}: unknown image extension {ext or '(none)'!r}: expected .png, .jpg, .webp, "
                        ".bmp or .tiff")
    check_output_file(path, option)
    return fmt


def check_output_file(path: str, option: str = "--out") -> None:
    """A file that can be written at `path`; its directory may not exist yet (it is created later)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} {path} is a directory: expected a file name")
    _check_writable_below(p.absolute().parent, path, option)
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{option} {path}: the file exists and is not writable")


def check_output_dir(path: str, option: str = "--out") -> None:
    """A directory that exists or can be made, and can be written in."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {path} is a file: expected a directory (new or existing)")
    _check_writable_below(p.absolute(), path, option)


def check_new_output_dir(path, force: bool, option: str = "--out") -> None:
    """A directory to create, or (with --force) to replace: never a file, never a non-empty
    directory without --force, and somewhere we can write."""
    check_output_dir(str(path), option)
    p = Path(path)
    if p.is_dir() and any(p.iterdir()) and not force:
        raise UserError(f"{option} {path} exists and is not empty: pass --force to replace it, or choose another directory")


def _check_writable_below(directory: Path, path: str, option: str) -> None:
    """The nearest existing ancestor of `directory` is a directory we can create files in."""
    while not directory.exists():
        directory = directory.parent
    if not directory.is_dir():
        raise UserError(f"{option} {path}: {directory} is a file, not a directory")
    try:  # a real write, not os.access: root passes os.access on read-only file systems
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise UserError(f"{option} {path}: cannot write in directory {directory} ({err.strerror})") from None


def save_image(image, path: str, fmt: str) -> None:
    """Write through a temporary file in the same directory and rename: never a partial image."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format=fmt)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------- input images (PIL only: checked before torch loads)

MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold (~ 9459 x 9459)
MAX_ASPECT = 8.0  # the centre crop keeps the middle square: beyond 8:1 it keeps under 1/8 of the image


def check_image(path: str) -> tuple[int, int]:
    """Reads the header only: (width, height), or a UserError saying why `path` cannot be captioned
    (missing, empty, not an image, too many pixels, an aspect ratio beyond 8:1, corrupt data)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: empty file (0 bytes)")
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                _check_size(path, w, h)
                im.verify()  # structure and checksums, without decoding every pixel
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image file PIL can read (expected JPEG, PNG, WebP, BMP, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path}: more than {MAX_PIXELS:,} pixels (a decompression bomb?)") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise UserError(f"{path}: corrupt image data ({type(err).__name__}: {err})") from None
    return w, h


def _check_size(path: str, w: int, h: int) -> None:
    if w < 1 or h < 1:
        raise UserError(f"{path}: the image is {w} x {h} pixels: expected at least 1 x 1")
    if w * h > MAX_PIXELS:
        raise UserError(f"{path}: {w} x {h} = {w * h:,} pixels, more than the limit of {MAX_PIXELS:,} "
                        "(a decompression bomb?)")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise UserError(f"{path}: {w} x {h} pixels has aspect ratio {max(w, h) / min(w, h):.0f}:1, beyond "
                        f"{MAX_ASPECT:.0f}:1 (the centre square crop would drop most of it)")
