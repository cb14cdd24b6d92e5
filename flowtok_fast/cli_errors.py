"""The CLI's error boundary: an error a user can fix becomes one line on stderr,
`flowtok-fast <verb>: error: <message>`, and exit code 2; anything else is a bug and keeps its
traceback. FLOWTOK_DEBUG=1 (or --debug) re-raises everything, traceback included.

Library errors are wrapped into UserErrors where the file or field is known (checkpoint.py,
validate.py, captioning.py, ...); `describe` below is the last resort for the ones that escape,
and still names what the exception carries (a file name, a YAML mark)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sys
import warnings

from flowtok_fast.errors import FlowTokWarning, UserError

DEBUG_ENV = "FLOWTOK_DEBUG"
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
UNPICKLING_REFUSED = ("it holds pickled Python objects other than tensors, which flowtok-fast never unpickles "
                      "(they could run code): expected a plain state dict of tensors or a .safetensors file")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`prog: error: message`), exit code 2 as before."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def take_debug_flag(argv: list[str]) -> tuple[bool, list[str]]:
    """`--debug` anywhere before a `--` (every verb accepts it), or FLOWTOK_DEBUG=1."""
    end = argv.index("--") if "--" in argv else len(argv)
    flag = "--debug" in argv[:end]
    rest = [a for i, a in enumerate(argv) if not (i < end and a == "--debug")]
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0"), rest


def one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


_debugging = False  # set by run(): per-item reports (caption) show their traceback too


def print_error(verb: str, message) -> None:
    """One line for an error the verb handles itself and goes on (an unreadable image, ...)."""
    if _debugging and isinstance(message, BaseException):
        import traceback

        traceback.print_exception(message)
    print(f"flowtok-fast {verb}: error: {one_line(message)}", file=sys.stderr)


def describe(err: BaseException) -> str | None:
    """One line for an error a user can fix, or None for a bug (kept as a traceback)."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON: line {err.lineno} column {err.colno}: {err.msg}"
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not {err.encoding} text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
    if isinstance(err, pickle.UnpicklingError):
        return f"cannot read a checkpoint: {UNPICKLING_REFUSED}"
    message = _library_error(err)
    if message is not None:
        return message
    if isinstance(err, OSError):  # PIL.UnidentifiedImageError is one too and carries its file in str()
        if err.filename is not None and err.strerror:
            second = f" -> {err.filename2}" if err.filename2 is not None else ""
            return f"{err.filename}{second}: {err.strerror}"
        return str(err) or type(err).__name__
    if isinstance(err, MemoryError):
        return "out of memory: try a smaller --batch-size or a smaller input"
    if isinstance(err, EOFError):
        return f"a file ended early (truncated?): {err}" if str(err) else "a file ended early (truncated?)"
    return None


def _library_error(err: BaseException) -> str | None:
    """YAML, safetensors and PIL errors, looked up only if their module is already loaded."""
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        where = ""
        if mark is not None:  # a mark names the file only when YAML read from a stream of it
            named = mark.name and not str(mark.name).startswith("<")
            where = f"{mark.name + ': ' if named else ''}line {mark.line + 1} column {mark.column + 1}: "
        problem = getattr(err, "problem", None) or str(err)
        return f"invalid YAML: {where}{problem}"
    safetensors = sys.modules.get("safetensors")
    if safetensors is not None and isinstance(err, getattr(safetensors, "SafetensorError", ())):
        return f"invalid safetensors file: {err}"
    image = sys.modules.get("PIL.Image")
    if image is not None and isinstance(err, image.DecompressionBombError):
        return f"image too large: {err}"
    return None


@contextlib.contextmanager
def one_line_warnings(verb: str):
    """Our own warnings (FlowTokWarning) print as `flowtok-fast <verb>: warning: ...`, every time."""
    with warnings.catch_warnings():
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, FlowTokWarning):
                print(f"flowtok-fast {verb}: warning: {one_line(message)}", file=sys.stderr)
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("always", FlowTokWarning)
        yield


def run(verb: str, work, debug: bool) -> int:
    """work() -> exit code (None = 0), behind the boundary."""
    global _debugging
    _debugging = debug
    with one_line_warnings(verb):
        try:
            return work() or 0
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"flowtok-fast {verb}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as err:  # noqa: BLE001 - sorted below: fixable input vs a bug
            message = None if debug else describe(err)
            if message is None:
                raise
            if "weights_only" in message and not isinstance(err, UserError):  # torch's advice to unpickle anyway
                message = f"cannot read a checkpoint: {UNPICKLING_REFUSED}"
            print_error(verb, message)
            return EXIT_BAD_INPUT
