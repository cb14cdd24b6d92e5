"""flowtok-fast: a performance-first PyTorch + Triton engine for FlowTok.

    from flowtok_fast import FlowTokPipeline
    pipe = FlowTokPipeline.from_pretrained("flowtok-xl-256/")
    images = pipe(["a red bicycle by a lake"], steps=20, cfg_scale=2.0, seed=0)
"""
from flowtok_fast.configs import FlowTokConfig, get_config

__all__ = ["FlowTokPipeline", "FlowTokConfig", "get_config"]


def __getattr__(name):
    # lazy: importing the package stays cheap (no torch model code until asked for)
    if name == "FlowTokPipeline":
        from flowtok_fast.pipeline import FlowTokPipeline

        return FlowTokPipeline
    raise AttributeError(name)
