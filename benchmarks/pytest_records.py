"""pytest plugin for the GPU suite: one JSON line per test, appended the moment the test ends.

    FLOWTOK_SUITE_RECORDS=out/tests.jsonl FLOWTOK_SUITE_STEP="kernel tests" \
        python -m pytest -p benchmarks.pytest_records tests/kernels

A step stopped at its time limit keeps the record of every test that finished before.
"""
from __future__ import annotations

import json
import os


def _write(record: dict) -> None:
    path = os.environ.get("FLOWTOK_SUITE_RECORDS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def pytest_runtest_logreport(report) -> None:
    # the call phase for passes and failures; setup for skips and fixture errors; a failing teardown too
    if report.when == "call" or (report.when == "setup" and not report.passed) or \
            (report.when == "teardown" and report.failed):
        record = {"benchmark": "test", "step": os.environ.get("FLOWTOK_SUITE_STEP", ""), "test": report.nodeid,
                  "phase": report.when, "outcome": report.outcome, "seconds": round(report.duration, 3)}
        if report.skipped and isinstance(report.longrepr, tuple):
            record["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.failed:
            record["message"] = str(getattr(report.longrepr, "reprcrash", None) or report.longrepr)[-600:]
        _write(record)
