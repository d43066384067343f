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


def test_cli_eval_takes_the_language(tmp_path, monkeypatch, capsys):
    """`easel eval --lang zh` judges Chinese prompts (the report says so); a language it does not know is refused."""
    from easel.cli import main
    from easel.weights.model_io import save_model
    loaded = make_tiny(tmp_path, "sd1")
    loaded.model.config = dataclasses.replace(loaded.model.config, default_size=64)
    model = save_model(loaded, tmp_path / "tiny.safetensors")
    out = tmp_path / "ev"
    args = ["eval", "--model", str(model), "--per-category", "1", "--images-per-prompt", "1", "--steps", "1"]
    assert main([*args, "--lang", "zh", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lang"] == "zh" and any("\u4e00" <= ch <= "\u9fff" for im in report["images"] for ch in im["prompt"])
    capsys.readouterr()
    try:
        code = main([*args, "--lang", "fr", "--out", str(out)])
    except SystemExit as e:
        code = e.code
    assert code == 2 and "invalid choice: 'fr'" in capsys.readouterr().err
