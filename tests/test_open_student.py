"""The shipped few-step student of the open-task teacher (examples/shapes/models/open_student) still
scores what its card says, at every step count it was distilled for, eager and compiled: a change
to the sampler, the step conditioning, the compiled path or the checkpoint code that breaks a
distilled model fails here."""
import json
from pathlib import Path

import pytest

from examples.shapes import open_quality as OQ

MODELS = Path(__file__).resolve().parents[1] / "examples" / "shapes" / "models"
CARD = json.loads((MODELS / "open_student_quality.json").read_text())
POINTS = 3.0
pytestmark = pytest.mark.usefixtures("one_thread")


def _check(pipe, row: dict, what: str) -> None:
    measured = OQ.measure(pipe, OQ.prompts_of("eval"), row["steps"], row["grid"], 1.0)
    for score in OQ.SCORES:
        drift = 100 * abs(measured[score] - row[score])
        assert drift <= POINTS, f"{what}, {row['steps']} step(s): {score} {measured[score]:.3f}, card {row[score]:.3f}"


def test_student_is_small_and_says_how_to_sample_it():
    from flowtok_fast.pipeline import FlowTokPipeline

    size = sum(f.stat().st_size for f in (MODELS / "open_student").iterdir())
    assert size == CARD["bytes"] and size + sum(f.stat().st_size for f in (MODELS / "open_t2i").iterdir()) < 10 * 2**20
    pipe = FlowTokPipeline.from_pretrained(str(MODELS / "open_student"), device="cpu")
    assert pipe.generator.step_conditioned
    assert list(pipe.sampling.distilled_steps) == CARD["student"]["distilled_steps"]
    assert pipe.sampling_defaults["cfg_scale"] == 1.0 and pipe.sampling_defaults["steps"] in pipe.sampling.distilled_steps


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_student_holds_its_card(mode):
    from flowtok_fast.pipeline import FlowTokPipeline

    pipe = FlowTokPipeline.from_pretrained(str(MODELS / "open_student"), device="cpu", sampler_mode=mode)
    for row in CARD["results"]:
        _check(pipe, row, f"open student ({mode})")
