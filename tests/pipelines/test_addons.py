"""Issue 4's add-ons wired into generation: A1111 prompt syntax, textual inversion, LoRA, previews, the refiner."""
import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import easel
from tests.conftest import make_tiny
from tests.pipelines.test_conditioning import realistic_layer_norms
from tests.weights.test_lora import SD1_LAYERS, random_lora
from easel.cli import main
from easel.pipelines import common, plan
from easel.pipelines.txt2img import sample_latents
from easel.pipelines.metadata import infotext
from easel.pipelines.pipeline import Pipeline
from easel.pipelines.request import GenerationRequest
from easel.weights.lora import LoraNotFound, save_lora
from easel.weights.model_io import load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread_module")  # see tests/conftest.py
FAST = dict(width=32, height=32, steps=3, seed=5, batch_size=1, sampler="euler", cfg_scale=5.0)
PLAIN = "a red cat, the big dog"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No LoRAs, embeddings or cached preview maps from the machine: each test names its own folders."""
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EASEL_LORA_DIRS", str(tmp_path / "loras"))
    monkeypatch.setenv("EASEL_EMBEDDING_DIRS", str(tmp_path / "embeddings"))
    monkeypatch.chdir(tmp_path)  # ./models/Lora and ./models/embeddings are searched too


@pytest.fixture
def tiny(tmp_path):
    """A tiny SD1 whose LayerNorms have trained-like biases, so that emphasis has something to rescale."""
    loaded = make_tiny(tmp_path / "m", "sd1")
    realistic_layer_norms(loaded.model.text_encoders)
    return loaded


def pixels(results) -> np.ndarray:
    return np.stack([np.asarray(r.image, dtype=np.int16) for r in results])


def run(loaded, prompt=PLAIN, **kw):
    return Pipeline(loaded).generate(GenerationRequest(prompt, **{**FAST, **kw}))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, before):
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# --- prompt syntax -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["(a red cat:1.6), the big dog", "a red cat BREAK the big dog",
                                    "[a blue dog:a red cat:0.5], the big dog", "a red cat AND the big dog :0.7"],
                         ids=["emphasis", "break", "editing", "and"])
def test_prompt_syntax_changes_the_image(tiny, prompt):
    plain = pixels(run(tiny))
    assert np.array_equal(plain, pixels(run(tiny, "(a red cat:1), the big dog")))  # weight 1 is the plain prompt
    assert np.abs(pixels(run(tiny, prompt)) - plain).max() > 2


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_prompt_syntax_reaches_the_edit_modes(tiny, mode):
    image = Image.fromarray((np.indices((32, 32)).sum(0) * 4 % 256).astype(np.uint8)).convert("RGB")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    edit = dict(init_images=[image], denoising_strength=1.0, mask=mask if mode == "inpaint" else None)
    plain, emphasised = pixels(run(tiny, **edit)), pixels(run(tiny, "(a red cat:1.6), the big dog", **edit))
    assert np.abs(plain - emphasised).max() > 2


def test_editing_in_img2img_counts_the_steps_that_run(tiny, monkeypatch):
    """The guided denoiser gets the sigmas actually run: an img2img run's step 0 is its first step (as A1111)."""
    from easel.pipelines import conditioning
    texts, original = [], conditioning.GuidedDenoiser.forward

    def spy(self, x, sigma, **extra):
        texts.append(self.cond.texts_at(self.step_of(float(torch.as_tensor(sigma).reshape(-1)[0])))[0][0])
        return original(self, x, sigma, **extra)
    monkeypatch.setattr(conditioning.GuidedDenoiser, "forward", spy)
    steps = []
    req = GenerationRequest("[a red cat:a blue dog:1]", init_images=[Image.new("RGB", (32, 32), (90, 40, 200))],
                            denoising_strength=0.5, **{**FAST, "steps": 8})
    Pipeline(tiny).generate(req, lambda d: steps.append(d["i"]))
    assert steps == [0, 1, 2, 3] and texts == ["a red cat"] * 2 + ["a blue dog"] * 2


@pytest.mark.slow
def test_prompt_syntax_on_the_builtin_model():
    import easel
    pipe = easel.load()
    opts = dict(steps=4, seed=2, batch_size=1)
    plain = np.asarray(pipe.txt2img("three red stars", **opts)[0], dtype=np.int16)
    fancy = pipe.txt2img("(three red stars:1.3) BREAK [a blue circle:a green square:0.5] AND a yellow star :0.5",
                         **opts)[0]
    assert fancy.size == (64, 64) and np.abs(np.asarray(fancy, dtype=np.int16) - plain).max() > 10


# --- textual inversion -------------------------------------------------------------------------------
def test_embedding_file_used_by_name(tiny, tmp_path):
    from safetensors.torch import save_file
    req = GenerationRequest("a mystyle cat", **FAST).resolved(32, 1)
    sigmas = plan.request_sigmas(tiny.model, req)
    without = plan.guided_denoiser(tiny, req, 1, sigmas).cond.encoded[0]["context"]
    assert common.embedding_library(tiny) is common.embedding_library(tiny)  # one library per model: scanned once
    (tmp_path / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))},
              str(tmp_path / "embeddings" / "mystyle.safetensors"))
    with_it = plan.guided_denoiser(tiny, req, 1, sigmas).cond.encoded[0]["context"]  # the folder changed: rescan
    assert not torch.allclose(with_it, without)
    used = run(tiny, "a mystyle cat")
    assert np.abs(pixels(used) - pixels(run(tiny, "a cat"))).max() > 2
    digest = hashlib.sha256((tmp_path / "embeddings" / "mystyle.safetensors").read_bytes()).hexdigest()[:12]
    assert used[0].params["ti_hashes"] == {"mystyle": digest}  # A1111's "TI hashes"
    assert f"TI hashes: \"mystyle: {digest}\"" in infotext(used[0].params)
    assert "ti_hashes" not in run(tiny, "a cat")[0].params


def test_words_a_closed_vocabulary_model_never_saw_are_named(caplog):
    pipe = easel.load()  # the built-in model: its tokenizer was trained on ShapeWorld's captions only
    with caplog.at_level(logging.WARNING):
        out = pipe.generate(GenerationRequest("a photo of a cat, (three red stars:1.2)", "blurry", steps=1,
                                              batch_size=1, seed=1))
    assert out[0].warnings and "blurry, cat, photo" in out[0].warnings[0] and "blurry, cat, photo" in caplog.text
    assert pipe.generate(GenerationRequest("three red stars above a blue circle", steps=1, batch_size=1,
                                           seed=1))[0].warnings == []
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same words again: on the image, but logged only once
        again = pipe.generate(GenerationRequest("a photo of a cat, (three red stars:1.2)", "blurry", steps=1,
                                                batch_size=1, seed=2))
    assert again[0].warnings == out[0].warnings and "never trained" not in caplog.text
    from easel.pipelines.pipeline import prompt_report
    req = GenerationRequest("a photo of a heart")
    assert prompt_report(pipe.loaded, req)[1] and not prompt_report(pipe.loaded, req, with_loras=True)[1]


# --- LoRA --------------------------------------------------------------------------------------------
def write_lora(loaded, folder, name="style", extra=None):
    """A random LoRA over SD1_LAYERS of `loaded` (UNet and text encoder) in the LoRA folder."""
    folder.mkdir(parents=True, exist_ok=True)
    layers = random_lora(loaded.model, SD1_LAYERS, rank=4, seed=1)
    layers = {k: (d * 20, u * 20, a) for k, (d, u, a) in layers.items()}  # strong enough to show in 3 steps
    path = save_lora(folder / f"{name}.safetensors", layers, "kohya", "sd1", config=loaded.model.config)
    if extra:
        from easel.weights.load import read_state_dict, write_safetensors
        write_safetensors({**read_state_dict(path)[0], **extra}, path)
    return path


def addnet_hash(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_lora_by_tag_and_by_request_field(tiny, tmp_path):
    path = write_lora(tiny, tmp_path / "loras")
    before = snapshot(tiny.model)
    plain = pixels(run(tiny))
    tagged = run(tiny, PLAIN + " <lora:style:0.8>")
    assert_same_weights(tiny.model, before)  # unloaded bit for bit
    assert np.abs(pixels(tagged) - plain).max() > 2
    assert np.array_equal(pixels(run(tiny, loras=["style:0.8"])), pixels(tagged))
    assert np.array_equal(pixels(run(tiny, loras=[f"{path}:0.8"])), pixels(tagged))
    assert np.array_equal(pixels(run(tiny, PLAIN + " <lora:style:0>")), plain)  # weight 0: nothing merged
    assert not np.array_equal(pixels(run(tiny, PLAIN + " <lora:style:0.8:0>")), pixels(tagged))  # te 0.8, unet 0
    assert_same_weights(tiny.model, before)
    p = tagged[0].params
    assert p["lora_hashes"] == {"style": addnet_hash(path)[:12]} and p["prompt"].endswith("<lora:style:0.8>")
    assert f'Lora hashes: "style: {addnet_hash(path)[:12]}"' in infotext(p)


def test_lora_weights_restored_when_generation_fails(tiny, tmp_path):
    write_lora(tiny, tmp_path / "loras")
    before = snapshot(tiny.model)

    def boom(d):
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        Pipeline(tiny).generate(GenerationRequest(PLAIN + " <lora:style:1>", **FAST), boom)
    assert_same_weights(tiny.model, before)


def test_unknown_lora_names_what_there_is(tiny, tmp_path):
    write_lora(tiny, tmp_path / "loras")
    with pytest.raises(LoraNotFound, match=r"'nope' not found.*LoRAs found: (shapeworld-lcm, )?style"):
        run(tiny, PLAIN + " <lora:nope:1>")
    with pytest.raises(LoraNotFound, match="'other'"):
        run(tiny, loras=["other:0.5"])


def test_unmatched_keys_and_other_networks_are_reported(tiny, tmp_path, caplog):
    extra = {"lora_unet_no_such_block_to_q.lora_down.weight": torch.ones(2, 4),
             "lora_unet_no_such_block_to_q.lora_up.weight": torch.ones(4, 2)}
    write_lora(tiny, tmp_path / "loras", "odd", extra)
    with caplog.at_level(logging.WARNING, logger="easel"):
        res = run(tiny, PLAIN + " <lora:odd:0.5> <hypernet:foo:1>", negative_prompt="<lora:odd:1> blur")
    p = res[0].params
    assert p["lora_unmatched_keys"] == {"odd": 2}
    assert p["extra_networks_unsupported"] == ["<hypernet:foo:1>"]
    assert p["extra_networks_ignored"] == ["<lora:odd:1> (negative prompt)"]
    assert "no_such_block" in caplog.text and "<hypernet:foo:1>" in caplog.text


def test_cli_lora_error_is_one_line(tmp_path, tiny_sd1_file, capsys):
    write_lora(load_model(tiny_sd1_file), tmp_path / "loras", "mine")
    assert main(["generate", "a cat <lora:nope:1>", "--model", str(tiny_sd1_file), "--out", str(tmp_path / "o"),
                 "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("easel: error: LoRA 'nope' not found") and "mine" in err.split("LoRAs found:")[1]
    assert "Traceback" not in err and not (tmp_path / "o").exists()


# --- previews ----------------------------------------------------------------------------------------
def test_pipeline_previews_reach_the_callback_and_the_sink(tiny):
    seen, sunk = [], []
    req = GenerationRequest(PLAIN, preview_every=2, preview_mode="full", **{**FAST, "steps": 5, "batch_size": 2})
    Pipeline(tiny).generate(req, lambda d: seen.append(d), lambda step, ims: sunk.append((step, ims)))
    assert [d["i"] for d in seen if "preview" in d] == [1, 3]
    assert [s for s, _ in sunk] == [2, 4] and all(len(ims) == 2 and ims[0].size == (32, 32) for _, ims in sunk)
    want = common.decode(tiny.model, seen[1]["denoised"])  # 'full': the VAE decode of that step's x0
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(seen[1]["preview"], want))


@pytest.mark.parametrize("command", ["generate", "img2img"])
def test_cli_writes_preview_frames(tmp_path, tiny_sd1_file, capsys, command):
    out = tmp_path / "out"
    Image.new("RGB", (32, 32), (200, 30, 60)).save(tmp_path / "in.png")
    source = [str(tmp_path / "in.png")] if command == "img2img" else []
    args = [command, *source, "a red cat", "--model", str(tiny_sd1_file), "--out", str(out), "--steps", "5",
            "--preview-every", "2", "-n", "2", "--seed", "1", "--width", "32", "--height", "32"]
    assert main(args + (["--strength", "1"] if command == "img2img" else [])) == 0
    frames = sorted(p.name for p in (out / "previews" / "00000").glob("*.png"))
    assert frames == ["step_002_0.png", "step_002_1.png", "step_004_0.png", "step_004_1.png"]
    assert str(out / "previews" / "00000") in capsys.readouterr().err
    assert Image.open(out / "previews" / "00000" / "step_004_1.png").size == (32, 32)


def test_save_ships_the_preview_map(tiny, tmp_path):
    from safetensors import safe_open
    from easel.pipelines.preview import LATENT_RGB_KEY, LatentPreviewer
    path = Pipeline(tiny).save(tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        stored = LatentPreviewer.from_json(f.metadata()[LATENT_RGB_KEY])
    assert torch.equal(stored.weight, LatentPreviewer.for_model(tiny).weight)
    with pytest.raises(ValueError, match="text to text"):
        save_model(tiny, tmp_path / "bad.safetensors", extra_metadata={"x": 1})


# --- refiner -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """A tiny SDXL base, and a tiny refiner saved as a single file (as users pass it)."""
    d = tmp_path_factory.mktemp("xl")
    refiner = make_tiny(d / "r", "sdxl-refiner")
    return make_tiny(d / "base", "sdxl"), save_model(refiner, d / "refiner.safetensors")


def test_refiner_through_the_pipeline(xl):
    base, refiner_file = xl
    pipe = Pipeline(base)
    req = GenerationRequest("a red cat", "blue dog", refiner_checkpoint=str(refiner_file), refiner_switch_at=0.5,
                            **{**FAST, "steps": 4, "batch_size": 2})
    seen = []
    res = pipe.generate(req, lambda d: seen.append(d["model"]))
    assert seen == ["base"] * 2 + ["refiner"] * 2 and len(res) == 2
    assert (res[0].params["refiner_checkpoint"], res[0].params["refiner_switch_at"]) == (str(refiner_file), 0.5)
    refiner = pipe.refiner(str(refiner_file))
    assert pipe.refiner(str(refiner_file)) is refiner  # loaded once
    resolved = req.resolved(32, 1)
    ours = sample_latents(base, resolved, [5, 6], refiner=refiner)
    decoded = common.decode(refiner.model, ours)  # the refiner's VAE decodes
    assert np.array_equal(np.asarray(decoded[1]), np.asarray(res[1].image))
    assert "Refiner: " in infotext(res[0].params)


def test_refiner_alone_gets_its_aesthetic_scores(xl):
    from easel.pipelines.conditioning import refiner_vector
    pipe = Pipeline(xl[0])
    refiner = pipe.refiner(str(xl[1]))
    req = GenerationRequest("a red cat", "blue dog", **FAST).resolved(32, 1)
    ours = plan.guided_denoiser(refiner, req, 1, plan.request_sigmas(refiner.model, req))
    for pc, text, score in ((ours.cond, "a red cat", 6.0), (ours.uncond, "blue dog", 2.5)):
        pooled = common.encode_prompts(refiner.model, refiner.tokenizers, [text])["pooled"]
        torch.testing.assert_close(pc.encoded[0]["y"], refiner_vector(pooled, (32, 32), aesthetic_score=score),
                                   rtol=1e-5, atol=1e-6)
    assert ours.uncond.encoded[0]["y"].shape[1] == refiner.model.config.unet.adm_in_channels
    # and a whole txt2img run where the refiner does every step
    res = pipe.generate(GenerationRequest("a red cat", refiner_checkpoint=str(xl[1]), refiner_switch_at=0.1, **FAST))
    assert res[0].image.size == (32, 32)


def test_lora_reaches_the_refiner_too(xl, tmp_path):
    base, refiner_file = xl
    layer = "input_blocks.1.0.in_layers.2"  # a 32 -> 32 conv in both tiny UNets
    save_lora(tmp_path / "loras" / "xl.safetensors", random_lora(base.model, [layer], seed=4), "kohya", "sdxl",
              config=base.model.config)
    pipe = Pipeline(base)
    weights = [dict(m.model.named_modules())["unet." + layer].weight for m in (base, pipe.refiner(str(refiner_file)))]
    before = [w.clone() for w in weights]
    during = []
    req = GenerationRequest("a cat <lora:xl:1>", refiner_checkpoint=str(refiner_file), refiner_switch_at=0.5, **FAST)
    pipe.generate(req, lambda d: during.append([torch.equal(w, b) for w, b in zip(weights, before)]))
    assert during and all(d == [False, False] for d in during)  # merged into base and refiner while sampling
    assert all(torch.equal(w, b) for w, b in zip(weights, before))


def test_refiner_with_hires_and_where_it_is_refused(xl):
    base, refiner_file = xl
    pipe = Pipeline(base)
    phases = []
    res = pipe.generate(GenerationRequest("a cat", refiner_checkpoint=str(refiner_file), enable_hr=True, hr_scale=1.5,
                                          **{**FAST, "width": 16, "height": 16}),
                        lambda d: phases.append((d["phase"], d.get("model"))))
    assert res[0].image.size == (24, 24)
    assert phases[:3] == [("base", "base"), ("base", "base"), ("base", "refiner")] and phases[3][0] == "hires"
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="refiner.*not inpaint"):
        pipe.generate(GenerationRequest("x", init_images=[image], mask=Image.new("L", (32, 32), 255),
                                        refiner_checkpoint=str(refiner_file), **FAST))


# --- the CLI -----------------------------------------------------------------------------------------
def test_cli_refiner_flags_and_serve_command():
    from easel.cli import build_parser, request_from_args
    parser = build_parser()
    req = request_from_args(parser.parse_args(["generate", "x", "--refiner", "ref.safetensors",
                                               "--refiner-switch-at", "0.7"]))
    assert (req.refiner_checkpoint, req.refiner_switch_at) == ("ref.safetensors", 0.7)
    assert parser.parse_args(["serve"]).command == "serve"


def test_a1111_infotext_refiner_and_lora_hashes_read_back(tmp_path):
    from PIL import PngImagePlugin
    from easel.cli import params_from_image
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", 'a cat <lora:x:1>\nSteps: 4, Sampler: Euler, Seed: 3, Size: 32x32, '
                                'Lora hashes: "x: 0123456789ab", Refiner: sd_xl_refiner_1.0 [7440042bbd], '
                                'Refiner switch at: 0.8')
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    p = params_from_image(str(tmp_path / "a.png"))
    assert (p["refiner_checkpoint"], p["refiner_switch_at"], p["prompt"]) == ("sd_xl_refiner_1.0", 0.8,
                                                                              "a cat <lora:x:1>")
    json.dumps(p)
