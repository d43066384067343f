"""X/Y/Z plot: axis parsing (A1111 ranges, Prompt S/R), early errors, a 2x2 grid on the built-in model."""
import json

import numpy as np
import pytest
from PIL import Image

from easel import xyz
from easel.pipelines.request import GenerationRequest
from easel.weights.registry import builtin_model


@pytest.mark.parametrize("spec, values", [
    ("steps=1-5", [1, 2, 3, 4, 5]),
    ("steps=1-10 (+2)", [1, 3, 5, 7, 9]),
    ("steps=10-1 (-3)", [10, 7, 4, 1]),
    ("steps=5-15 [3]", [5, 10, 15]),
    ("steps=1-2 [4]", [1, 1, 1, 2]),  # int() of evenly spaced values, as A1111
    ("steps = 4, 8,12", [4, 8, 12]),
    ("cfg=1-2 [5]", [1.0, 1.25, 1.5, 1.75, 2.0]),
    ("cfg_scale=0.5-1.5 (+0.5), 7", [0.5, 1.0, 1.5, 7.0]),
    ("seed=-1, 3", [-1, 3]),
    ("seed=-5--3", [-5, -4, -3]),
    ("sampler=euler,DPM++ 2M Karras", ["euler", "DPM++ 2M Karras"]),
    ("size=64x64,96x64", [(64, 64), (96, 64)]),
    ('prompt_sr=red,"blue, bright",green', ["red", "blue, bright", "green"]),
    ("enable_hr=true,no", [True, False]),
    ("scheduler=none,karras", [None, "karras"]),
    ("styles=A,B", [["A"], ["B"]]),
])
def test_axis_values(spec, values):
    axis = xyz.parse_axis("x", spec)
    assert list(axis.values) == values


def test_aliases_and_labels():
    assert xyz.parse_axis("y", "cfg=3").field == "cfg_scale"
    assert xyz.parse_axis("y", "Checkpoint name=a.safetensors").field == "model"
    assert xyz.parse_axis("x", "steps=4,8").labels == ("Steps: 4", "Steps: 8")
    assert xyz.parse_axis("x", "sampler=euler").labels == ("euler",)
    assert xyz.parse_axis("x", "model=/m/dreamy.safetensors").labels == ("dreamy",)


@pytest.mark.parametrize("spec, message", [
    ("steps", r"--x 'steps': write FIELD=v1,v2"),
    ("stesp=1,2", r"--x stesp: unknown axis; did you mean 'steps'\?"),
    ("steps=a,2", r"--x steps: 'a' is not a whole number or a range"),
    ("steps=1-5 (-1)", r"--x steps: '1-5 \(-1\)' gives no values"),
    ("steps=1-5 (+0.5)", r"whole number"),
    ("cfg=x", r"--x cfg_scale: 'x' is not a number"),
    ("batch_size=1,2", r"--x batch_size: cannot be an axis \(each cell is one image\)"),
    ("steps=", r"--x steps: no values"),
    ("size=64,96", r"--x size: '64' is not WIDTHxHEIGHT"),
    ("enable_hr=maybe", r"'maybe' is not true or false"),
    ("steps=1-5000", r"gives 5000 values; at most 1000"),
])
def test_bad_axes_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        xyz.parse_axis("x", spec)


def test_cell_errors_name_axis_and_value():
    req = GenerationRequest("a red star", seed=1)
    with pytest.raises(ValueError, match=r"--x steps=0: steps must be at least 1"):
        xyz.cell_requests(req, [xyz.parse_axis("x", "steps=2,0")])
    with pytest.raises(ValueError, match=r"--y sampler=nope: .*sampler"):
        xyz.cell_requests(req, [xyz.parse_axis("x", "steps=2"), xyz.parse_axis("y", "sampler=euler,nope")])
    with pytest.raises(ValueError, match=r"--y width=60: width must be a positive multiple of 8"):
        xyz.cell_requests(req, [xyz.parse_axis("y", "width=64,60")])
    with pytest.raises(ValueError, match=r"prompt_sr: the first value 'green' is not in the prompt"):
        xyz.cell_requests(req, [xyz.parse_axis("x", "prompt_sr=green,blue")])
    with pytest.raises(ValueError, match="two --x axes"):
        xyz.cell_requests(req, [xyz.parse_axis("x", "steps=1"), xyz.parse_axis("x", "cfg=1")])
    with pytest.raises(ValueError, match=r"--x model=nope-model.safetensors"):
        xyz.validate(req, [xyz.parse_axis("x", "model=nope-model.safetensors")])


def test_cells_prompt_sr_seed_and_size():
    req = GenerationRequest("a red star <lora:x:0.5>", negative_prompt="red blur", seed=-1, batch_size=4)
    axes = [xyz.parse_axis("x", "prompt_sr=red,blue"), xyz.parse_axis("y", "size=64x64,96x64"),
            xyz.parse_axis("z", 'prompt_sr=":0.5>",":1>"')]
    cells = xyz.cell_requests(req, axes)
    assert len(cells) == 8
    assert cells[(1, 0, 1)].prompt == "a blue star <lora:x:1>" and cells[(1, 0, 1)].negative_prompt == "blue blur"
    assert cells[(0, 1, 0)].prompt == req.prompt and (cells[(0, 1, 0)].width, cells[(0, 1, 0)].height) == (96, 64)
    assert len({c.seed for c in cells.values()}) == 1 and cells[(0, 0, 0)].seed >= 0  # one seed for every cell
    assert all(c.batch_size == 1 and c.n_iter == 1 for c in cells.values())
    seeds = xyz.cell_requests(GenerationRequest("x", seed=5), [xyz.parse_axis("x", "seed=-1,7")])
    assert seeds[(0, 0, 0)].seed >= 0 and seeds[(1, 0, 0)].seed == 7


def test_grid_layout_labels_and_stacked_z():
    cells = [[Image.new("RGB", (64, 64), c) for c in ("red", "blue")] for _ in range(2)]
    grid = xyz.draw_grid(cells, ["Steps: 1", "Steps: 2"], ["CFG Scale: 1", "CFG Scale: 5"])
    a = np.asarray(grid)
    left, top = grid.width - 128, grid.height - 128
    assert left > 20 and top > 8
    assert (a[:top, left:] < 128).any() and (a[top:, :left] < 128).any()  # label text drawn in both margins
    assert (a[top + 5, left + 5] == [255, 0, 0]).all() and (a[top + 5, left + 70] == [0, 0, 255]).all()
    stacked = xyz._stack([grid, grid])
    assert stacked.height == 2 * grid.height + 12


@pytest.mark.skipif(builtin_model() is None, reason="this install has no built-in model")
def test_plot_2x2_on_builtin_model(tmp_path):
    import easel
    pipe = easel.load(None)
    req = GenerationRequest("a red star above a blue circle", seed=3)
    axes = [xyz.parse_axis("x", "steps=1-2"), xyz.parse_axis("y", "cfg=1,5")]
    seen = []
    result = xyz.plot(pipe, req, axes, callback=lambda d: seen.append(d["i"]))
    assert len(seen) == 1 + 2 + 1 + 2  # every step of every cell
    size = pipe.config.default_size
    assert result.grid.height - 2 * size > 8 and result.grid.width - 2 * size > 20  # label margins
    grid_path, cells = result.save(tmp_path / "grid.png")
    assert [p.name for p in cells] == ["x0-y0-z0.png", "x1-y0-z0.png", "x0-y1-z0.png", "x1-y1-z0.png"]
    assert cells[0].parent == tmp_path / "grid-cells"
    p = json.loads(Image.open(cells[3]).info["easel"])
    assert (p["steps"], p["cfg_scale"], p["seed"]) == (2, 5.0, 3)
    assert "Steps: 2" in Image.open(cells[3]).info["parameters"]
    info = Image.open(grid_path).info["parameters"]
    assert 'Script: X/Y/Z plot, X Type: Steps, X Values: "1,2", Y Type: CFG Scale, Y Values: "1,5"' in info
    # the cells in the grid are the saved ones, and a second run repeats them
    im = np.asarray(Image.open(grid_path))
    left, top = result.grid.width - 2 * size, result.grid.height - 2 * size
    assert (im[top + size:, left + size:] == np.asarray(Image.open(cells[3]).convert("RGB"))).all()
    again = xyz.plot(pipe, req, axes)
    assert (np.asarray(again.grid) == np.asarray(result.grid)).all()


def test_cli_rejects_bad_axis_before_loading(capsys, monkeypatch):
    from easel import cli
    monkeypatch.setattr("easel.load", lambda *a, **k: pytest.fail("the model must not load"))
    assert cli.main(["xyz", "a red star", "--x", "steps=1,zero"]) == 2
    assert "--x steps: 'zero' is not a whole number" in capsys.readouterr().err


def test_a1111_script_args():
    from easel.xyz_a1111 import axes_from_script_args, menu
    steps, cfg, sampler = (next(i for i, (label, _) in enumerate(menu()) if label == name)
                           for name in ("Steps", "CFG Scale", "Sampler"))
    axes = axes_from_script_args([steps, "10-20 (+5)", [], cfg, "3,7", None, 0, "", None, True, False, False, False])
    assert [(a.name, a.field, list(a.values)) for a in axes] == [("x", "steps", [10, 15, 20]),
                                                                  ("y", "cfg_scale", [3.0, 7.0])]
    axes = axes_from_script_args([sampler, "", ["Euler a", "DPM++ 2M"], "Prompt S/R", "red,blue", []])
    assert list(axes[0].values) == ["Euler a", "DPM++ 2M"] and axes[1].field == "prompt_sr"
    assert [label for label, _ in menu(img2img=True)][6] == "Image CFG Scale"  # the img2img tab's menu differs
    with pytest.raises(ValueError, match="'VAE' is not supported by easel"):
        axes_from_script_args(["VAE", "a,b", []])
    with pytest.raises(ValueError, match="X type 999 is not in the"):
        axes_from_script_args([999, "1", []])
    with pytest.raises(ValueError, match="unknown Y type 'Stpes'"):
        axes_from_script_args([steps, "1", [], "Stpes", "1", []])
    with pytest.raises(ValueError, match="every axis is 'Nothing'"):
        axes_from_script_args([0, "", []])
    with pytest.raises(ValueError, match="must be a list"):
        axes_from_script_args("steps")


@pytest.mark.skipif(builtin_model() is None, reason="this install has no built-in model")
def test_model_axis_loads_each_checkpoint_once(tmp_path):
    import easel
    pipe = easel.load(None)
    path = str(builtin_model())
    loaded = []

    def load(spec):
        loaded.append(spec)
        return pipe
    axes = [xyz.parse_axis("x", "steps=1,2"), xyz.parse_axis("y", f"model={path},{path}")]
    result = xyz.plot(None, GenerationRequest("a red star", seed=1), axes, load=load)
    assert loaded == [path, path] and len(result.cells) == 4
    assert result.axes[1].labels == (builtin_model().stem,) * 2
    with pytest.raises(ValueError, match="needs a pipeline"):
        xyz.plot(None, GenerationRequest("a red star", seed=1), [xyz.parse_axis("x", "steps=1")])
