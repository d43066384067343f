"""`easel generate/img2img/inpaint --controlnet ...`: grouped flags, several units, the PNG's parameters, errors."""
import json

import numpy as np
import pytest
from PIL import Image

from tests.pipelines.test_control import control_image, controlnet_file
from easel.cli import build_parser, control_units, main
from easel.pipelines.metadata import read_image_params

FAST = ["--steps", "3", "--width", "32", "--height", "32", "--seed", "3"]


def test_flags_group_by_the_controlnet_before_them():
    args = build_parser().parse_args(["generate", "x", "--controlnet", "a", "--control-image", "i.png",
                                      "--control-weight", "0.5", "--controlnet", "b", "--control-mode", "prompt",
                                      "--preprocessor", "canny", "--control-start", "0.2", "--control-end", "0.8"])
    assert args.controlnets == [{"model": "a", "image": "i.png", "weight": 0.5},
                                {"model": "b", "control_mode": "prompt", "preprocessor": "canny",
                                 "guidance_start": 0.2, "guidance_end": 0.8}]
    assert not hasattr(build_parser().parse_args(["generate", "x"]), "controlnets")


@pytest.mark.parametrize("argv,match", [(["--control-weight", "1"], "must follow the --controlnet"),
                                        (["--controlnet", "a", "--control-weight", "1", "--control-weight", "2"],
                                         "given twice for ControlNet 1")])
def test_flag_errors(argv, match, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "x", *argv])
    assert match in capsys.readouterr().err


def test_missing_control_image_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--control-image of ControlNet 1 not found"):
        control_units([{"model": "a", "image": str(tmp_path / "nope.png")}])


def test_generate_and_inpaint_with_controlnets(tmp_path, tiny_sd1_file, capsys):
    cn = controlnet_file(tmp_path)[0]
    control_image().save(tmp_path / "edges.png")
    out = tmp_path / "out"
    assert main(["generate", "a red cat", "--model", str(tiny_sd1_file), *FAST, "--out", str(out),
                 "--controlnet", str(cn), "--control-image", str(tmp_path / "edges.png"), "--preprocessor", "canny",
                 "--control-weight", "0.8", "--controlnet", str(cn), "--control-image", str(tmp_path / "edges.png"),
                 "--control-mode", "control"]) == 0
    made = next(out.glob("*.png"))
    params = read_image_params(made)
    assert [u["control_mode"] for u in params["controlnet_units"]] == ["balanced", "control"]
    assert params["controlnet_infotext"]["ControlNet 1"].endswith("Control Mode: ControlNet is more important")
    assert main(["generate", "a red cat", "--model", str(tiny_sd1_file), *FAST, "--out", str(tmp_path / "plain")]) == 0
    plain = next((tmp_path / "plain").glob("*.png"))
    assert np.abs(np.asarray(Image.open(made)).astype(int) - np.asarray(Image.open(plain)).astype(int)).max() > 3
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    assert main(["inpaint", str(tmp_path / "edges.png"), str(tmp_path / "mask.png"), "a cat", "--model",
                 str(tiny_sd1_file), *FAST, "--out", str(tmp_path / "inp"), "--controlnet", str(cn),
                 "--preprocessor", "inpaint"]) == 0  # the init image and the mask feed the unit
    json.dumps(params)  # everything recorded is JSON


def test_depth_preprocessor_names_the_weights_file(tmp_path, tiny_sd1_file, capsys):
    control_image().save(tmp_path / "c.png")
    assert main(["generate", "x", "--model", str(tiny_sd1_file), *FAST, "--out", str(tmp_path / "o"),
                 "--controlnet", "whatever", "--control-image", str(tmp_path / "c.png"), "--preprocessor",
                 "depth"]) == 2
    assert "dpt_hybrid-midas-501f0c75.pt" in capsys.readouterr().err
