"""`easel merge`: A1111's weighted sum and add difference are exact float32 arithmetic on every tensor, the
inpainting case keeps A's mask channels, the metadata names the sources and their hashes, a VAE and a LoRA can be
put in, and mismatched models fail with one clear line."""
from __future__ import annotations

import json

import pytest
import torch

from easel.weights.load import file_sha256, read_state_dict
from easel.weights.merge import MergeError, merge_parts, merge_tensor, parse_lora
from easel.weights.model_io import load_model, read_model, save_model
from tests.conftest import make_tiny


def _saved(tmp_path, name, family="sd1", seed=0):
    return save_model(make_tiny(tmp_path / name, family, seed=seed), tmp_path / f"{name}.safetensors")


def test_weighted_sum_and_add_difference_are_exact(tmp_path):
    from easel.cli import main
    a, b, c = (_saved(tmp_path, n, seed=s) for n, s in (("a", 0), ("b", 1), ("c", 2)))
    A, B, C = (read_state_dict(p)[0] for p in (a, b, c))
    assert main(["merge", str(a), str(b), "--alpha", "0.3", "--out", str(tmp_path / "ws.safetensors")]) == 0
    assert main(["merge", str(a), str(b), str(c), "-M", "0.7", "--out", str(tmp_path / "ad.safetensors")]) == 0
    ws, meta = read_state_dict(tmp_path / "ws.safetensors")
    ad, _ = read_state_dict(tmp_path / "ad.safetensors")
    assert ws.keys() == A.keys() == ad.keys()
    for k, t in A.items():
        assert torch.equal(ws[k], (t.float() * 0.7 + B[k].float() * 0.3).to(t.dtype)), k
        assert torch.equal(ad[k], (t.float() + (B[k].float() - C[k].float()) * 0.7).to(t.dtype)), k
    assert not torch.equal(ws[k], A[k])
    rec, models = json.loads(meta["sd_merge_recipe"]), json.loads(meta["sd_merge_models"])
    assert rec["interp_method"] == "Weighted sum" and rec["multiplier"] == 0.3
    assert rec["primary_model_hash"] == file_sha256(a) and rec["secondary_model_hash"] == file_sha256(b)
    assert models[file_sha256(b)] == {"name": "b.safetensors", "legacy_hash": file_sha256(b)[:10]}
    assert load_model(tmp_path / "ws.safetensors").model.config.unet == load_model(a).model.config.unet


def test_alpha_ends_give_the_sources(tmp_path):
    a, b = _saved(tmp_path, "a"), _saved(tmp_path, "b", seed=1)
    pa, pb = read_model(a)[1], read_model(b)[1]
    for alpha, want in ((0.0, pa), (1.0, pb)):
        out = merge_parts(pa, pb, None, alpha, "weighted-sum")
        assert all(torch.equal(out[p][k], want[p][k]) for p in out for k in out[p])


def test_inpainting_a_keeps_its_mask_channels():
    a, b, c = torch.randn(8, 9, 3, 3), torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    out = merge_tensor(a, b, c, 0.5, "add-difference")
    assert torch.equal(out[:, 4:], a[:, 4:]) and torch.equal(out[:, :4], a[:, :4] + (b - c) * 0.5)
    with pytest.raises(MergeError, match="A is .*\\(8, 4, 3, 3\\), B is \\(8, 9, 3, 3\\).*inpainting model must be A"):
        merge_parts({"unet": {"w": b}}, {"unet": {"w": a}}, None, 0.5, "weighted-sum")


def test_vae_and_lora_baked_in_and_diffusers_output(tmp_path):
    from easel.weights.lora import apply_loras, save_lora
    a, b = _saved(tmp_path, "a"), _saved(tmp_path, "b", seed=1)
    v = _saved(tmp_path, "v", seed=3)
    base = load_model(a)
    layer = "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    weight = dict(base.model.named_modules())[layer].weight
    g = torch.Generator().manual_seed(0)
    lora = save_lora(tmp_path / "style.safetensors", {layer: (torch.randn(2, weight.shape[1], generator=g),
                                                             torch.randn(weight.shape[0], 2, generator=g), 2.0)},
                     config=base.model.config)
    from easel.weights.merge import merge_models
    out = merge_models([a, b], tmp_path / "m.safetensors", 0.0, vae=str(v), loras=[(str(lora), 0.5)])
    merged = load_model(out).model
    ref = load_model(a)
    with apply_loras(ref.model, [(lora, 0.5)]):
        assert torch.equal(dict(merged.named_modules())[layer].weight, dict(ref.model.named_modules())[layer].weight)
    vae_ref = load_model(v).model.vae.state_dict()
    assert all(torch.equal(t, vae_ref[k]) for k, t in merged.vae.state_dict().items())
    assert json.loads(read_state_dict(out)[1]["sd_merge_recipe"])["easel_loras"] == [f"{lora}:0.5"]
    folder = merge_models([a, b], tmp_path / "folder", 0.5, to="diffusers")
    assert (folder / "model_index.json").exists() and load_model(folder).model.config.unet == merged.config.unet


def test_bad_merges_are_one_line(tmp_path, capsys):
    from easel.cli import main
    a, xl = _saved(tmp_path, "a"), _saved(tmp_path, "xl", "sdxl")
    assert main(["merge", str(a), str(xl), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "another kind of model" in err and "one family" in err and "\n" not in err
    assert main(["merge", str(a), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "give 2 models (A B) or 3 (A B C)" in capsys.readouterr().err
    assert main(["merge", str(a), str(a), "--mode", "add-difference", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "add-difference needs three models" in capsys.readouterr().err
    assert main(["merge", str(a), str(a), "--alpha", "1.5", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "outside 0..1" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    assert parse_lora("style:0.5") == ("style", 0.5) and parse_lora("style") == ("style", 1.0)


def test_block_weights_merge_each_unet_block_at_its_own_m(tmp_path):
    """IN.., M00, OUT.. each at their M (A1111's Merge Block Weighted order); the rest at --alpha."""
    from easel.cli import main
    from easel.weights.merge import BlockAlpha, block_names, unet_block_counts
    a, b = _saved(tmp_path, "a"), _saved(tmp_path, "b", seed=1)
    pa, pb = read_model(a)[1], read_model(b)[1]
    n_in, n_out = unet_block_counts(pa["unet"])
    assert n_in >= 2 and n_out >= 2
    weights = [round(0.05 * i, 2) for i in range(n_in + 1 + n_out)]
    arg = ",".join(str(w) for w in weights)
    out = tmp_path / "mbw.safetensors"
    assert main(["merge", str(a), str(b), "--alpha", "0.9", "--block-weights", arg, "--out", str(out)]) == 0
    merged = read_model(out)[1]
    per = BlockAlpha(0.9, weights, (n_in, n_out))
    checked = set()
    for part, sd in pa.items():
        for k, t in sd.items():
            if not t.is_floating_point():
                continue
            m = per(part, k)
            assert torch.equal(merged[part][k], (t.float() * (1 - m) + pb[part][k].float() * m).to(t.dtype)), k
            checked.add(m)
    assert {0.0, weights[n_in], weights[-1], 0.9} <= checked  # IN00, M00, OUT(last), and the rest at --alpha
    assert per("unet", "middle_block.0.in_layers.0.weight") == weights[n_in]
    assert per("unet", "output_blocks.1.0.skip.weight") == weights[n_in + 2]
    assert per("unet", "time_embed.0.weight") == per("vae", "decoder.conv_in.weight") == 0.9
    assert json.loads(read_state_dict(out)[1]["sd_merge_recipe"])["block_weights"] == weights
    assert block_names(2, 2) == ["IN00", "IN01", "M00", "OUT00", "OUT01"]


def test_block_weights_errors_name_the_count_and_the_value(tmp_path, capsys):
    from easel.cli import main
    a, b = _saved(tmp_path, "a"), _saved(tmp_path, "b", seed=1)
    out = tmp_path / "x.safetensors"
    assert main(["merge", str(a), str(b), "--block-weights", "0.5,0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--block-weights has 2 values; this UNet has" in err and "M00" in err
    assert main(["merge", str(a), str(b), "--block-weights", "0.5,x", "--out", str(out)]) == 2
    assert "--block-weights value 2 ('x') is not a number" in capsys.readouterr().err
    assert not out.exists()
