"""flowtok-fast: a performance-first PyTorch + Triton engine for FlowTok."""
