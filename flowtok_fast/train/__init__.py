"""Training: `torchrun --nproc_per_node=N -m flowtok_fast.train CONFIG [key=value ...]`.

config.py (TrainConfig), data.py (batch contract, synthetic source), frozen.py (CLIP and image
encoder), parallelize.py (DDP / FSDP2 / checkpointing / compile / fused kernels), ema.py,
checkpoint.py (DCP, atomic; read through dcp_safe.py, never unpickled without restriction),
loop.py (the loop both trainers share: signals, metrics, resume), trainer.py (the generator's
step), export_model.py (a checkpoint -> a model directory for generate / caption). The objective
is flowtok_fast/objective.py.
"""
from flowtok_fast.train.config import TrainConfig, load_config
from flowtok_fast.train.trainer import NonFiniteLossError, Trainer

__all__ = ["TrainConfig", "load_config", "Trainer", "NonFiniteLossError", "main"]


def main(argv=None) -> int:
    from flowtok_fast.train.__main__ import main as _main

    return _main(argv)
