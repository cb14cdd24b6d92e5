# Triton runs on the CPU only in its interpreter, and @triton.jit picks interpreter or compiler
# when the decorator runs (at import). So this must happen before anything imports the kernels.
# On a GPU machine run the suite with TRITON_INTERPRET=0 to test the compiled kernels on CUDA.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub: tests use local files only

import pytest  # noqa: E402

# One exported package for the whole session (tests/test_deploy.py, tests/evaluation/test_t2i_package.py):
# AOTInductor compiles C++ for each stage, ~75 CPU-seconds, so it is made once.
PACKAGE_BATCH, PACKAGE_STEPS, PACKAGE_CFG = 2, 3, 2.0


def flowing_tiny(seed: int = 0):
    """The tiny random model, with DiT's zero-initialised layers (adaLN, output) made random too:
    otherwise the velocity is 0 and the flow stage (and the noise) would not be tested at all."""
    from flowtok_fast.pipeline import FlowTokPipeline

    return FlowTokPipeline.random("tiny", seed=seed, device="cpu", flowing=True)


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after (tiny tensors on shared cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def flowing_tiny_pipeline():
    return flowing_tiny(0)


@pytest.fixture(scope="session")
def tiny_package(flowing_tiny_pipeline, tmp_path_factory):
    """flowing_tiny_pipeline exported (fp32, CPU); tests copy it before damaging it."""
    from flowtok_fast.deploy.export import export_package

    out = tmp_path_factory.mktemp("deploy") / "pkg"
    return export_package(flowing_tiny_pipeline, out, PACKAGE_BATCH, PACKAGE_STEPS, PACKAGE_CFG, progress=False)


def run_cli(argv, capsys):
    """`flowtok-fast ARGV` in-process: (exit code, stdout, stderr)."""
    from flowtok_fast import cli

    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
