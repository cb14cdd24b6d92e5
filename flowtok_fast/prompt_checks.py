"""Warnings about prompts the model will read differently from what the user wrote."""
from __future__ import annotations

import warnings

from flowtok_fast.errors import FlowTokWarning
from flowtok_fast.models.text import overlong_prompts


def warn_if_truncated(prompts: list[str]) -> None:
    """CLIP reads 77 tokens (start + 75 + end): say so when a prompt is longer, never silently."""
    for prompt, n in overlong_prompts(prompts):
        shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        warnings.warn(FlowTokWarning(f"prompt {shown!r} is {n + 2} CLIP tokens long: truncated to 77 tokens"),
                      stacklevel=3)


def warn_if_unknown_words(prompts: list[str], vocabulary: frozenset[int] | None) -> None:
    """A closed-vocabulary model (the shapes example's) reads words it was never trained on as
    zeros: say which words, never silently."""
    if vocabulary is None:
        return
    from flowtok_fast.models.text import words_outside

    for prompt in prompts:
        unknown = words_outside(prompt, vocabulary)
        if unknown:
            warnings.warn(FlowTokWarning(f"prompt {prompt[:40]!r}: {', '.join(map(repr, unknown[:5]))} outside this "
                                         f"model's {len(vocabulary)}-token vocabulary (read as a blank: the model never saw it)"), stacklevel=3)
