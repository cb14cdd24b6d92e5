"""--random-weights: an untrained model whose flow moves (DiT's zero-initialised layers drawn too),
said to be untrained. Without it the velocity is 0: guidance, steps and the prompt's flow do nothing."""
import torch

from flowtok_fast.captioning import FlowTokCaptioner
from flowtok_fast.pipeline import FlowTokPipeline
from tests.conftest import run_cli
from tests.test_cli_errors import RANDOM, good_image


def guidance_changes_the_output(make):
    a, b = (make(cfg) for cfg in (1.0, 4.0))
    return not torch.equal(a, b)


def test_a_flowing_random_pipeline_moves():
    for flowing, moves in ((False, False), (True, True)):
        pipe = FlowTokPipeline.random("tiny", device="cpu", flowing=flowing)
        images = lambda cfg: pipe(["a red circle"], steps=2, cfg_scale=cfg, output="tensor")  # noqa: E731
        assert guidance_changes_the_output(images) is moves, flowing


def test_a_flowing_random_captioner_moves():
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for flowing, moves in ((False, False), (True, True)):
        cap = FlowTokCaptioner.random("tiny", device="cpu", flowing=flowing)
        latents = lambda cfg: cap.text_latents(cap.image_latents(pixels), cap.sampling_options(steps=2, cfg_scale=cfg))  # noqa: E731
        assert guidance_changes_the_output(latents) is moves, flowing


def test_caption_random_weights_says_untrained(tmp_path, capsys):
    code, out, err = run_cli(["caption", good_image(tmp_path / "a.png"), *RANDOM, "--steps", "1"], capsys)
    assert code == 0 and out.startswith(str(tmp_path / "a.png"))
    assert "--random-weights: the 'tiny' model is untrained" in err


def test_generate_random_weights_flows_and_says_untrained(tmp_path, capsys):
    grids = []
    for cfg in ("1", "4"):
        out = tmp_path / f"cfg{cfg}.png"
        code, stdout, err = run_cli(["generate", *RANDOM, "--prompt", "a cat", "--steps", "2", "--cfg", cfg,
                                     "--out", str(out)], capsys)
        assert code == 0, err
        assert "--random-weights: the 'tiny' model is untrained" in stdout
        grids.append(out.read_bytes())
    assert grids[0] != grids[1]  # guidance acts: the velocity is not 0
