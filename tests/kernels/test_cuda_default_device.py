"""The kernel tests that once failed only on a GPU machine, where CUDA is the default device
(the tests built "CPU" tensors on the default device, or expected "cpu" in a message, or timed
no kernel on the CPU without the interpreter), run here under a fake non-CPU default device
(tests/kernels/fake_cuda_default.py) in a child pytest. Before the fix each of them failed this
way; a canary shows the fake is in force."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

UNDER_FAKE_DEVICE = [
    "tests/kernels/test_attention.py::test_cpu_without_interpreter_raises",
    "tests/kernels/test_adaln.py::test_cpu_without_interpreter_is_refused",
    "tests/kernels/test_swiglu.py::test_cpu_without_interpreter_is_refused",
    "tests/kernels/test_flow_step.py::test_cpu_without_interpreter_is_refused",
    "tests/kernels/test_flow_step.py::test_bad_inputs",
    "tests/kernels/test_benchmarks.py::test_implementations_agree[swiglu_linear]",
    # Passes only when the fake is in force (not a test_* file: collected only when named).
    "tests/kernels/fake_device_canary.py",
]


def test_kernel_tests_pass_with_a_non_cpu_default_device():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.kernels.fake_cuda_default",
         *UNDER_FAKE_DEVICE],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"under a fake CUDA default device:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert f"{len(UNDER_FAKE_DEVICE)} passed" in summary, summary
