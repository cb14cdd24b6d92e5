from setuptools import setup

# kernels/ lives at the top of the repository for readability but is installed as
# flowtok_fast.kernels: a top-level `kernels` package would shadow an unrelated PyPI package.
setup(
    name="flowtok-fast",
    version="0.1.0",
    description="A fast PyTorch + Triton engine for FlowTok (text <-> image flow over 1-D tokens)",
    python_requires=">=3.10",
    packages=["flowtok_fast", "flowtok_fast.models", "flowtok_fast.train", "flowtok_fast.perf", "flowtok_fast.kernels"],
    package_dir={"flowtok_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "numpy",
        "pillow",
        "safetensors",
        "tqdm",
        "open_clip_torch",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest"],
        "dali": ["nvidia-dali-cuda130", "webdataset"],
        "cuda": ["flash-attn", "xformers"],
    },
    entry_points={"console_scripts": ["flowtok-fast=flowtok_fast.cli:main"]},
)
