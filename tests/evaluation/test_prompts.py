"""Prompt files: text lines, COCO Karpathy (COCO-30K sampling from a seed), MJHQ-30K meta."""
import json

import pytest

from flowtok_fast.errors import UserError
from flowtok_fast.evaluation.prompts import load_prompts, write_prompt_list


def karpathy(path, n=6):
    images = [{"filepath": "val2014" if i % 3 else "train2014", "filename": f"{i}.jpg", "cocoid": 100 + i, "split": "test",
               "sentences": [{"raw": f"image {i} caption {j}"} for j in range(5)]} for i in range(n * 3 // 2)]
    path.write_text(json.dumps({"images": images}))
    return str(path)


def test_text_lines_skip_blanks(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert [r.prompt for r in load_prompts(str(f))] == ["a cat", "a dog"]


def test_coco_30k_is_one_caption_per_val_image_and_reproducible(tmp_path):
    path = karpathy(tmp_path / "dataset_coco.json")
    a, b, c = load_prompts(path, seed=0), load_prompts(path, seed=0), load_prompts(path, seed=1)
    assert a == b and a != c
    ids = [r.source_id for r in a]
    assert len(ids) == len(set(ids)) == 6  # the val2014 images only, each once
    assert all(r.prompt.startswith(f"image {int(r.source_id) - 100} ") for r in a)
    write_prompt_list(a, str(tmp_path / "chosen.jsonl"))
    lines = [json.loads(x) for x in (tmp_path / "chosen.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in lines] == [r.prompt for r in a] and lines[2]["index"] == 2


def test_mjhq_keeps_categories(tmp_path):
    f = tmp_path / "meta_data.json"
    f.write_text(json.dumps({"id1": {"prompt": "a fox", "category": "animals"}, "id2": {"prompt": "a car", "category": "things"}}))
    recs = load_prompts(str(f))
    assert [(r.prompt, r.category, r.source_id) for r in recs] == [("a fox", "animals", "id1"), ("a car", "things", "id2")]


def test_bad_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="no prompts found"):
        load_prompts(str(empty))
    two = tmp_path / "two.txt"
    two.write_text("a\nb\n")
    with pytest.raises(UserError, match="--num-images 3 exceeds the 2 prompts"):
        load_prompts(str(two), num_images=3)
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    with pytest.raises(UserError, match="unknown JSON layout"):
        load_prompts(str(other))
