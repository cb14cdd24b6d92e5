import pytest

# The tiny model on a few small synthetic batches: a step takes a fraction of a second on CPU.
TINY_RUN = dict(
    model="tiny", global_batch=8, micro_batch=4, lr=1e-3, warmup_steps=2, ema_decay=0.9,
    steps=3, data_size=64, log_interval=100, ckpt_interval=1000, progress=False, resume="none", seed=0,
)


@pytest.fixture
def tiny_run():
    return dict(TINY_RUN)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    # Tiny tensors: on shared cores intra-op threads only add synchronisation (measured: a tiny
    # training step is ~10x slower with 2 threads than with 1 when other jobs load the machine).
    yield
