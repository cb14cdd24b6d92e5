"""Triton kernels of flowtok-fast, installed as ``flowtok_fast.kernels``.

One file per fused op: Triton kernel(s), a plain PyTorch ``*_ref`` beside it, and the
``torch.library`` registration (schema, fake implementation, autograd) under the
``flowtok::`` namespace so ``torch.compile(fullgraph=True)`` traces through it.
"""
