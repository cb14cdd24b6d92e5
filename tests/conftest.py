# Triton runs on the CPU only in its interpreter, and @triton.jit picks interpreter or compiler
# when the decorator runs (at import). So this must happen before anything imports the kernels.
# On a GPU machine run the suite with TRITON_INTERPRET=0 to test the compiled kernels on CUDA.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub: tests use local files only
