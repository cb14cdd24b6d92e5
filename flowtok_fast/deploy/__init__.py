"""Deployment: the three stages exported ahead of time (torch.export + AOTInductor) into `.pt2`
packages with a manifest, loaded without compiling from Python (`PackagePipeline`) or from the
C++ runner `flowtok-run` (native/)."""
