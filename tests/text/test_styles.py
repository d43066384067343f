"""A1111 styles.csv: {prompt} placeholder or appended with ', ', negative prompts, order, errors."""
import pytest

from easel.pipelines.request import GenerationRequest
from easel.text.styles import apply_styles, load_styles, merge_prompts, read_styles

CSV = ('name,prompt,negative_prompt\n'
       '"Cinematic","cinematic still of {prompt}, film grain","cartoon, drawing"\n'
       'Sharp,"sharp focus, 8k",blurry\n'
       'Empty,,\n')


@pytest.fixture
def styles_file(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(CSV, encoding="utf-8")
    return path


def test_merge_prompts_as_a1111():
    assert merge_prompts("art of {prompt}, oil", "a cat") == "art of a cat, oil"
    assert merge_prompts("sharp", "a cat") == "a cat, sharp"
    assert merge_prompts("sharp", "") == "sharp"
    assert merge_prompts("", "a cat ") == "a cat"


def test_apply_in_order_to_both_prompts(styles_file):
    styles = read_styles(styles_file)
    assert set(styles) == {"Cinematic", "Sharp", "Empty"}
    p, n = apply_styles("a cat", "ugly", ["Cinematic", "sharp"], styles)  # names: exact, else any case
    assert p == "cinematic still of a cat, film grain, sharp focus, 8k"
    assert n == "ugly, cartoon, drawing, blurry"
    assert apply_styles("a cat", "", ["Empty"], styles) == ("a cat", "")


def test_unknown_style_and_missing_file(styles_file, tmp_path, monkeypatch):
    styles = read_styles(styles_file)
    with pytest.raises(ValueError, match=r"unknown style 'Sharpp'; did you mean 'Sharp'\? the styles are: "):
        apply_styles("x", "", ["Sharpp"], styles)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "styles.csv").unlink()
    monkeypatch.delenv("EASEL_STYLES", raising=False)
    with pytest.raises(ValueError, match="no styles file was found"):
        apply_styles("x", "", ["Sharp"])
    with pytest.raises(FileNotFoundError, match="styles file not found"):
        load_styles([tmp_path / "nope.csv"])
    bad = tmp_path / "bad.csv"
    bad.write_text("title,text\na,b\n")
    with pytest.raises(ValueError, match="first line must name the columns name,prompt,negative_prompt"):
        read_styles(bad)


def test_request_applies_styles_then_wildcards(styles_file, tmp_path, monkeypatch):
    monkeypatch.setenv("EASEL_STYLES", str(styles_file))
    req = GenerationRequest("a {red|blue} cat", negative_prompt="ugly", styles=["Cinematic"], seed=4)
    r = req.resolved(64, 1)
    assert r.prompt in ("cinematic still of a red cat, film grain", "cinematic still of a blue cat, film grain")
    assert r.negative_prompt == "ugly, cartoon, drawing"
    assert r.styles == [] and r.extra["applied_styles"] == ["Cinematic"]  # not "styles": --from must not reapply
    assert r.extra["prompt_template"] == "a {red|blue} cat"
    assert r.resolved(64, 1).prompt == r.prompt  # styles are applied once
    with pytest.raises(ValueError, match="unknown style 'nope'"):
        GenerationRequest("x", styles=["nope"]).check()
    with pytest.raises(ValueError, match="styles must be a list of style names"):
        GenerationRequest("x", styles="Sharp").check()
    assert GenerationRequest.from_dict({"prompt": "x", "styles": ["Sharp"]}).styles == ["Sharp"]  # A1111's field


def test_cli_style_and_wildcards_flags_reach_the_png(tmp_path, tiny_sd1_file, monkeypatch):
    import json

    from PIL import Image

    from easel.cli import main
    for env in ("EASEL_STYLES", "EASEL_WILDCARDS"):  # the flags prepend to these: setenv restores (removes) them
        monkeypatch.setenv(env, "")                    # after the test; delenv of an unset one would not
    monkeypatch.chdir(tmp_path)
    (tmp_path / "styles.csv").unlink(missing_ok=True)
    styles = tmp_path / "my-styles.csv"
    styles.write_text('name,prompt,negative_prompt\nPhoto,"a photo of {prompt}",blue\n')
    folder = tmp_path / "wc"
    folder.mkdir()
    (folder / "animal.txt").write_text("cat\ndog\n")
    out = tmp_path / "out"
    assert main(["generate", "a {red|green} __animal__", "--style", "Photo", "--styles-file", str(styles),
                 "--wildcards", str(folder), "--model", str(tiny_sd1_file), "--steps", "1", "--seed", "3",
                 "-n", "1", "--out", str(out)]) == 0
    params = json.loads(Image.open(next(out.glob("*.png"))).info["easel"])
    assert params["prompt"] in {f"a photo of a {c} {a}" for c in ("red", "green") for a in ("cat", "dog")}
    assert params["negative_prompt"] == "blue"
    assert main(["generate", "x", "--style", "Nope", "--styles-file", str(styles), "--out", str(out)]) == 2
