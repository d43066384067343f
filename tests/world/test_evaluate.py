"""`easel eval` plumbing on a tiny random model (the scores of a random model are near the floor)."""
import dataclasses
import json

from easel.pipelines.pipeline import Pipeline
from easel.world.benchmark import CATEGORIES
from easel.world.evaluate import EvalSettings, run_eval
from tests.conftest import make_tiny


def test_eval_writes_every_row_and_grid(tmp_path):
    loaded = make_tiny(tmp_path, "sd1")
    loaded.model.config = dataclasses.replace(loaded.model.config, default_size=64)
    report = run_eval(Pipeline(loaded), EvalSettings(per_category=1, images_per_prompt=2, steps=2), tmp_path / "ev")
    rows = report["rows"]
    assert set(rows) == {"generated", "ground truth", "shuffled prompts (floor)", "VAE reconstruction (ceiling)"}
    assert all(rows["ground truth"][c] >= 0.99 for c in CATEGORIES)  # the judge itself is right
    assert rows["generated"]["overall"] < 0.5  # random weights draw no shapes
    assert len(report["images"]) == 2 * len(CATEGORIES)
    saved = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert saved["rows"] == rows
    assert (tmp_path / "ev" / "report.md").read_text().startswith("| |")
    assert (tmp_path / "ev" / "failures.png").is_file()
