"""`python -m flowtok_fast.train CONFIG [key=value ...]`, or under torchrun for several processes."""
from __future__ import annotations

import argparse
import sys

from flowtok_fast.cli_errors import OneLineParser
from flowtok_fast.train.config import load_config
from flowtok_fast.train.trainer import Trainer, distributed_run


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="flowtok-fast train",
        description="Train FlowTok. Launch with torchrun --nproc_per_node=N for DDP or FSDP.",
    )
    parser.add_argument("config", help="YAML training config, e.g. configs/train/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. steps=100 lr=2e-4")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.fused_kernels:  # before any model is built: the device the run will get
        import torch

        from flowtok_fast.validate import check_fused_kernels

        check_fused_kernels("cuda" if torch.cuda.is_available() else "cpu", "fused_kernels=true")
    with distributed_run() as device:
        trainer = Trainer(cfg, device=device)
        trainer.train()
    return trainer.exit_code()  # 130 after Ctrl-C, 143 after SIGTERM: stopped early, checkpoint saved


if __name__ == "__main__":
    sys.exit(main())
