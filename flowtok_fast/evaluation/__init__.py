"""The paper's evaluation protocol: prompt files -> sharded, resumable generation -> clean-fid FID
(+ CLIP score) -> results.json / results.md; and COCO Karpathy captioning scored with metrics.py.
Entry points: flowtok_fast.evaluation.cli (`flowtok-fast evaluate t2i|i2t`) and
flowtok_fast.evaluation.fid_stats (`flowtok-fast fid-stats`)."""
