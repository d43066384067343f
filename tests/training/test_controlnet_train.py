"""`easel train controlnet`: a layout ControlNet that starts as a no-op copy of the UNet's encoder, trains, resumes
and loads as any ControlNet file does."""
import torch

from easel.training.cli import main
from easel.training.controlnet_train import ControlledUNet, controlnet_from_unet, hints
from easel.weights.controlnet_load import load_controlnet
from easel.weights.load import read_state_dict


def test_fresh_controlnet_is_the_unets_encoder_and_changes_nothing(tiny_sd1):
    unet = tiny_sd1.model.unet
    net = controlnet_from_unet(tiny_sd1)
    assert torch.equal(net.state_dict()["input_blocks.1.0.in_layers.2.weight"],
                       unet.state_dict()["input_blocks.1.0.in_layers.2.weight"])
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    hint = torch.rand(2, 3, 32, 32)
    assert torch.equal(ControlledUNet(unet, net)(x, t, ctx, hint), unet(x, t, ctx))


def test_hints_are_blobs_with_new_jitter_each_step():
    places = torch.tensor([[[0.3, 0.5, 0.15], [0.7, 0.5, 0.15], [0, 0, 0], [0, 0, 0], [0, 0, 0]]])
    a, b, c = hints(places, 32, 0, 1), hints(places, 32, 0, 1), hints(places, 32, 0, 2)
    assert a.shape == (1, 3, 32, 32) and set(a.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cli_trains_resumes_and_writes_a_loadable_controlnet(tiny_sd1_file, tmp_path, capsys):
    args = ["controlnet", "--model", str(tiny_sd1_file), "--out", str(tmp_path), "--scenes", "16",
            "--batch-size", "4", "--lr", "1e-2", "--warmup", "0", "--no-progress", "--threads", "1"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "3"]) == 0  # continues from step 2 with the same encoded scenes
    err = capsys.readouterr().err
    assert "resuming at step 2" in err
    path = tmp_path / "shapeworld-layout.safetensors"
    sd, meta = read_state_dict(path)
    assert meta["kind"] == "controlnet" and all(k.startswith("control_model.") for k in sd)
    assert float(sd["control_model.middle_block_out.0.weight"].abs().max()) > 0  # the zero conv learnt
    from easel.weights.model_io import load_model
    loaded = load_controlnet(path, load_model(tiny_sd1_file).model.config)
    assert loaded.name == "shapeworld-layout"
    assert main(args + ["--steps", "1", "--scenes", "2"]) == 2  # fewer scenes than a batch: one line, exit 2
