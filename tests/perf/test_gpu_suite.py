"""The GPU suite, rehearsed on CPU so that nothing in it is left to the lease: the whole plan end to
end (tiny shapes, kernels in the interpreter, CUDA-only parts skipped with their reason) in a
subprocess that can import only what the GPU machine will have (tests/perf/gpu_image.py, with
the wheels of scripts/gpu_wheels.sh); its plan and budgets; process-group timeouts."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import gpu_image

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _suite():
    if "gpu_suite" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
        sys.modules["gpu_suite"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_suite"]


def _image_env(tmp_path, extra_blocked=()):
    site = tmp_path / "gpu_image"
    blocked = gpu_image.write_sitecustomize(site)
    if extra_blocked:
        text = (site / "sitecustomize.py").read_text()
        (site / "sitecustomize.py").write_text(text.replace("BLOCKED = {", "BLOCKED = {" + ", ".join(map(repr, extra_blocked)) + ", ", 1))
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1",
               FLOWTOK_CACHE_DIR=str(tmp_path / "cache"))
    return env, blocked


def test_image_hides_what_the_gpu_machine_lacks(tmp_path):
    env, blocked = _image_env(tmp_path)
    assert {"open_clip", "ftfy", "wcwidth", "webdataset", "braceexpand", "nvidia.dali"} <= set(blocked)
    assert not {"torch", "triton", "numpy", "yaml", "tqdm", "PIL", "safetensors", "pytest"} & set(blocked)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n" \
           "    except ModuleNotFoundError:\n        print('hidden', m)\n"
    p = subprocess.run([sys.executable, "-c", code, "open_clip", "webdataset", "yaml"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.stdout.split("\n")[:2] == ["hidden open_clip", "hidden webdataset"] and "yaml" not in p.stdout, p.stderr


def test_dry_run_plan_fits_the_budget_without_torch(tmp_path):
    # the parent imports the standard library only: planning works with torch hidden
    env, _ = _image_env(tmp_path, extra_blocked=("torch",))
    p = subprocess.run([sys.executable, str(SUITE), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    budgets = [float(line.split("]")[0].strip("[ s")) for line in p.stdout.splitlines() if line.startswith("[")]
    assert 0 < sum(budgets) <= 540 and len(budgets) == 8
    for part in ("(a) kernel tests", "(b) CUDA-graph sampler", "(c) throughput XL+H: eager, fused, fused-graph",
                 "(c) throughput H: compiled-graph", "(d) train XL", "(d) train H", "(e) kernel benchmark"):
        assert part in p.stdout, part
    assert "tests/kernels" in p.stdout and "--batch 64 --steps 20 --cfg 2.0" in p.stdout


def test_carried_training_plan_is_for_an_h200():
    plan = json.loads((ROOT / "benchmarks" / "gpu_plan.json").read_text())
    for m in ("XL", "H", "tiny"):
        e = plan[m]
        assert e["gpu_mem_gib"] == 139.0 and e["batch"] % 8 == 0 and 8 <= e["batch"] <= e["plan_per_gpu_batch"]
        assert e["fixed_gib"] < e["predicted_peak_gib"] < 139.0 - 2 and e["ops"] in ("reference", "triton")


def test_timeout_kills_the_whole_process_group(tmp_path):
    gs = _suite()
    pidfile = tmp_path / "grandchild"
    # a child that starts a grandchild (like Inductor's compile workers) and outlives the limit
    cmd = ["bash", "-c", f"sleep 120 & echo $! > {pidfile}; wait"]
    t0 = time.time()
    r = gs.run_group(cmd, dict(os.environ), timeout=6)  # seconds for bash to start even on a busy machine
    assert r["timed_out"] and r["rc"] == "timeout" and time.time() - t0 < 60
    grandchild = int(pidfile.read_text())

    def alive(pid):  # a killed process may linger as a zombie until its new parent reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    for _ in range(50):
        if not alive(grandchild):
            break
        time.sleep(0.1)
    assert not alive(grandchild)


def test_rehearsal_runs_every_step_on_cpu(tmp_path):
    # the worst case, whatever ran before: setuptools imported here (it puts its _vendor folder on
    # sys.path) and an empty Inductor cache (the compile then imports setuptools in the child)
    import setuptools  # noqa: F401

    env, blocked = _image_env(tmp_path)
    assert "jaraco" not in blocked  # setuptools' own vendored packages, present on the GPU machine too
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(SUITE), "--rehearse", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    log = p.stdout[-4000:] + p.stderr[-2000:]
    assert p.returncode == 0, log
    assert "No module named" not in p.stdout, log  # nothing hidden was imported, in any step
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    planned = [s.name for s in _suite().plan_steps(out, True, ROOT / "benchmarks" / "gpu_plan.json")]
    assert [s["step"] for s in steps] == planned
    assert all(s["rc"] == 0 for s in steps), [(s["step"], s["rc"], s["runs"][-1].get("tail", "")[-800:]) for s in steps]

    def rows(name):
        return [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines()]

    tests = rows("tests")
    assert any(t["step"] == "kernel tests" and t["outcome"] == "passed" for t in tests)
    assert not [t for t in tests if t["outcome"] == "failed"]
    assert any(t["step"] == "sampler tests" and t["outcome"] == "skipped" and "CUDA" in t["reason"] for t in tests)
    thr = {(r["benchmark"], r["mode"]): r for r in rows("throughput")}
    assert thr[("throughput", "eager")]["images_per_s"] > 0
    for mode in ("fused", "fused-graph", "graph"):  # CUDA-only: recorded, with the reason
        assert "CUDA" in thr[("skipped", mode)]["reason"]
    train = [r for r in rows("train") if r["benchmark"] == "train"]
    assert train and train[0]["model"] == "tiny" and train[0]["samples_per_s"] > 0
    assert rows("kernels") and all("p50_ms" in r or "error" in r for r in rows("kernels"))
    md = (out / "gpu_suite.md").read_text()
    assert md.startswith("# GPU suite REHEARSAL") and md.rstrip().splitlines()[-1].startswith("Planned")
    assert p.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the summary is printed last
    for name in planned:
        assert f"| {name} |" in md


def test_kernel_groups_cover_the_benchmarks_ops():
    """The rehearsal runs one kernel op; the groups of the real run must name kernels.py's ops exactly."""
    spec = importlib.util.spec_from_file_location("kernels_benchmark", ROOT / "benchmarks" / "kernels.py")
    kb = sys.modules["kernels_benchmark"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kb)
    grouped = [op for g in _suite().KERNEL_GROUPS for op in g]
    assert sorted(grouped) == sorted(kb.OPS) and len(set(grouped)) == len(grouped)


def test_kernel_step_runs_every_gpu_relevant_kernel_test_file():
    # a new tests/kernels file must be placed in the suite's order (or named as CPU-only), not silently left out
    order = _suite().KERNEL_TEST_ORDER
    on_disk = {p.stem.removeprefix("test_") for p in (ROOT / "tests" / "kernels").glob("test_*.py")}
    cpu_only = {"gpu_compile", "cuda_default_device"}
    assert set(order) == on_disk - cpu_only and len(order) == len(set(order))
