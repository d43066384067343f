"""A1111 prompt conditioning: weights, BREAK, long prompts, comma backtrack, embeddings, schedules, AND, guidance."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from easel.pipelines.common import encode_prompts, make_denoiser, make_schedule, sigmas_for
from easel.pipelines.conditioning import (EmbeddingMatcher, apply_emphasis, build_conditioning, encode_weighted,
                                          GuidedDenoiser, tokenize_chunks, unet_conditioning)
from easel.samplers import SAMPLERS, CFGDenoiser
from easel.weights.embeddings import Embedding, EmbeddingError, EmbeddingLibrary
from tests.conftest import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    out = {fam: make_tiny(root / fam, fam) for fam in ("sd1", "sd2", "sdxl")}
    for loaded in out.values():
        realistic_layer_norms(loaded.model.text_encoders)
    return out


def realistic_layer_norms(module, seed=0):
    """Freshly initialised LayerNorms (weight 1, bias 0) give hidden states of mean ~1e-9, on which the mean
    renormalisation of emphasis is noise; trained CLIPs have biased LayerNorms, so give these some too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 + 0.1 * torch.randn(m.bias.shape, generator=gen))


@pytest.fixture(scope="module")
def sd1(models):
    return models["sd1"]


def enc(loaded, text, **kw):
    return encode_weighted(loaded.model, loaded.tokenizers, text, **kw)


def vecs(n, d=32, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# --- encoding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_plain_prompt_equals_encode_prompts(models, family, clip_skip):
    loaded = models[family]
    for text in ("a red cat, the big dog", ""):
        ours = enc(loaded, text, clip_skip=clip_skip)
        ref = encode_prompts(loaded.model, loaded.tokenizers, [text], clip_skip)
        assert torch.equal(ours["context"], ref["context"])
        assert (ref["pooled"] is None and ours["pooled"] is None) or torch.equal(ours["pooled"], ref["pooled"])
    skipped = enc(loaded, "a red cat", clip_skip=2)["context"]
    assert not torch.allclose(skipped, enc(loaded, "a red cat", clip_skip=1)["context"])


def emphasised(z, weights):
    """The emphasis re-computed by hand: z * w, times mean(z) / mean(z * w)."""
    zw = z * weights[:, None]
    return zw * (z.mean() / zw.mean())


@pytest.mark.parametrize("syntax, weight", [("(red:1.5)", 1.5), ("(red)", 1.1), ("[red]", 1 / 1.1),
                                            ("((red))", 1.1 * 1.1), ("(red:0.5)", 0.5)])
def test_weight_scales_token_then_restores_mean(sd1, syntax, weight):
    plain = encode_prompts(sd1.model, sd1.tokenizers, ["a red cat"])["context"][0]  # (77, D)
    w = torch.ones(77)
    w[2] = weight  # BOS, "a", "red"
    got = enc(sd1, f"a {syntax} cat")["context"][0]
    assert torch.allclose(got, emphasised(plain, w), rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.mean(), plain.mean(), rtol=1e-5)
    ratio = got[2] / plain[2]  # the weighted token moved by weight x (mean ratio), the others by the mean ratio
    assert torch.allclose(ratio / (got[3] / plain[3]).mean(), torch.full_like(ratio, weight), rtol=1e-4)


def test_sdxl_emphasis_per_encoder(models):
    xl = models["sdxl"]
    plain = encode_prompts(xl.model, xl.tokenizers, ["a red cat"])["context"][0]  # (77, 32 + 32)
    w = torch.ones(77)
    w[2] = 1.4
    want = torch.cat([emphasised(plain[:, :32], w), emphasised(plain[:, 32:], w)], dim=-1)
    got = enc(xl, "a (red:1.4) cat")
    assert torch.allclose(got["context"][0], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got["pooled"], encode_prompts(xl.model, xl.tokenizers, ["a red cat"])["pooled"])


def test_apply_emphasis_rows_are_independent():
    z = torch.randn(2, 5, 3)
    w = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0], [1.0] * 5])
    out = apply_emphasis(z, w)
    assert torch.allclose(out[0], emphasised(z[0], w[0])) and torch.equal(out[1], z[1])


def test_break_makes_two_chunks(sd1):
    got = enc(sd1, "a red cat BREAK a blue dog")["context"]
    assert got.shape == (1, 154, 32)
    for i, text in enumerate(["a red cat", "a blue dog"]):
        ref = encode_prompts(sd1.model, sd1.tokenizers, [text])["context"][0]
        assert torch.allclose(got[0, 77 * i:77 * (i + 1)], ref, atol=1e-6)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_long_prompt_is_two_chunks_not_truncated(models, family):
    loaded = models[family]
    got = enc(loaded, " ".join(["cat"] * 75 + ["dog"] * 5))
    assert got["context"].shape == (1, 154, loaded.model.config.unet.context_dim)
    tail = encode_prompts(loaded.model, loaded.tokenizers, ["dog dog dog dog dog"])
    assert torch.allclose(got["context"][0, 77:], tail["context"][0], atol=1e-6)
    head = encode_prompts(loaded.model, loaded.tokenizers, [" ".join(["cat"] * 75)])
    assert torch.allclose(got["context"][0, :77], head["context"][0], atol=1e-6)
    if family == "sdxl":  # pooled from the first chunk of the last encoder
        assert torch.allclose(got["pooled"], head["pooled"], atol=1e-6)


def chunk_lengths(loaded, text, matcher=None):
    from easel.text.prompt import parse_attention
    return [len(c.ids) for c in tokenize_chunks(parse_attention(text), loaded.tokenizers[0], 75, matcher)]


def test_chunking_rules(sd1):
    assert chunk_lengths(sd1, " ".join(["cat"] * 75)) == [75]
    assert chunk_lengths(sd1, " ".join(["cat"] * 76)) == [75, 1]
    assert chunk_lengths(sd1, "") == [0]
    assert chunk_lengths(sd1, "cat BREAK BREAK dog") == [1, 0, 1]
    # a comma among the last 20 tokens: the words after it move to the next chunk
    assert chunk_lengths(sd1, " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)) == [71, 10]
    # a comma further back is not used
    assert chunk_lengths(sd1, " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30)) == [75, 6]


def test_chunks_are_framed_with_each_encoders_pad(models):
    xl = models["sdxl"]
    got = enc(xl, "a cat BREAK dog")
    ref = encode_prompts(xl.model, xl.tokenizers, ["dog"])  # CLIP-L pads with EOS, OpenCLIP with "!"
    assert torch.allclose(got["context"][0, 77:], ref["context"][0], atol=1e-6)


# --- textual inversion ------------------------------------------------------------------------------
def manual_ti(loaded, before, vectors, after):
    """Hidden states with `vectors` spliced in after the tokens of `before`, computed by hand."""
    tok, cfg = loaded.tokenizers[0], loaded.model.config.text_encoders[0]
    pre, post = tok.encode(before), tok.encode(after)
    n = vectors.shape[0]
    ids = [tok.bos_id, *pre, *([0] * n), *post, tok.eos_id]
    ids = torch.tensor([ids + [cfg.pad_token_id] * (77 - len(ids))])
    embeds = loaded.model.text_encoders[0].text_model.embeddings.token_embedding(ids).detach().clone()
    embeds[0, 1 + len(pre):1 + len(pre) + n] = vectors
    return loaded.model.encode_text([ids], inputs_embeds=[embeds])[0]


def test_embedding_word_replaced_by_its_vectors(sd1):
    v = vecs(3)
    got = enc(sd1, "a mystyle cat", library={"mystyle": Embedding("mystyle", {"*": v})})["context"]
    assert torch.allclose(got, manual_ti(sd1, "a", v, "cat"), atol=1e-6)
    weighted = enc(sd1, "a (mystyle:1.3) cat", library={"mystyle": Embedding("mystyle", {"*": v})})["context"]
    w = torch.ones(77)
    w[2:5] = 1.3  # every vector carries the word's weight
    assert torch.allclose(weighted[0], emphasised(got[0], w), rtol=1e-5, atol=1e-6)


def test_embedding_counts_against_the_budget_and_matches_whole_words(sd1):
    lib = {"mystyle": Embedding("mystyle", {"*": vecs(3)})}
    matcher = EmbeddingMatcher(sd1.tokenizers[0], lib and _lib(lib))
    assert chunk_lengths(sd1, "a mystyle cat", matcher) == [5]
    assert chunk_lengths(sd1, " ".join(["cat"] * 73) + " mystyle", matcher) == [73, 3]  # never split
    plain = len(sd1.tokenizers[0].encode("amystyle cat"))
    assert chunk_lengths(sd1, "amystyle cat", matcher) == [plain]  # the tail of another word is not a name


def _lib(items):
    from easel.pipelines.conditioning import _as_library
    return _as_library(items)


def write_formats(folder, v, xl=None):
    """The same vectors in every file layout: {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "x"}, folder / "aa.pt")
    torch.save({"string_to_param": {"*": v}}, folder / "bb.bin")
    save_file({"emb_params": v}, str(folder / "cc.safetensors"))
    torch.save({"<tok>": v}, folder / "dd.bin")
    save_file({"<tok>": v}, str(folder / "ee.safetensors"))
    return ["aa", "bb", "cc", "dd", "ee"]


def test_every_file_format_through_the_library(sd1, tmp_path):
    v = vecs(2, seed=5)
    names = write_formats(tmp_path / "emb", v)
    lib = EmbeddingLibrary([tmp_path / "emb"])
    want = manual_ti(sd1, "a", v, "cat")
    for name in names:
        cond, _ = build_conditioning(sd1, f"a {name} cat", "", 4, 1, 32, 32, embeddings=lib)
        assert torch.allclose(cond.encoded[0]["context"], want, atol=1e-6), name


def test_sdxl_embedding_uses_clip_l_and_clip_g(models, tmp_path):
    xl = models["sdxl"]
    save_file({"clip_l": vecs(2, seed=1), "clip_g": vecs(2, seed=2)}, str(tmp_path / "xl1.safetensors"))
    save_file({"clip_l": vecs(2, seed=1), "clip_g": vecs(2, seed=3)}, str(tmp_path / "xl2.safetensors"))
    lib = EmbeddingLibrary([tmp_path])
    one, two = enc(xl, "a xl1 cat", library=lib), enc(xl, "a xl2 cat", library=lib)
    assert torch.equal(one["context"][..., :32], two["context"][..., :32])  # clip_l part unchanged
    assert not torch.allclose(one["context"][..., 32:], two["context"][..., 32:])
    assert not torch.allclose(one["pooled"], two["pooled"])  # pooled comes from clip_g
    with pytest.raises(EmbeddingError, match="'xl1' is an SDXL embedding"):
        enc(models["sd1"], "a xl1 cat", library=lib)


def test_embedding_width_mismatch_names_everything(sd1):
    with pytest.raises(EmbeddingError, match=r"'narrow' has vectors of width 16.*32 wide"):
        enc(sd1, "a narrow cat", library={"narrow": Embedding("narrow", {"*": vecs(1, 16)})})


# --- schedules, AND and guidance --------------------------------------------------------------------
class Recorder:
    """An inner denoiser that records the conditioning of each call and returns something that depends on it."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, **cond):
        self.calls.append({k: v.clone() for k, v in cond.items()})
        return x + cond["context"].mean(dim=(1, 2)).reshape(-1, *[1] * (x.ndim - 1))


def test_editing_switches_at_the_right_step(sd1):
    cond, uncond = build_conditioning(sd1, "a [cat:dog:5] photo", "", 10, 1, 32, 32)
    assert [cond.texts_at(i)[0][0] for i in range(10)] == ["a cat photo"] * 6 + ["a dog photo"] * 4  # A1111: step <= 5
    sigmas = sigmas_for(make_schedule(sd1.model), "karras", 10)
    rec = Recorder()
    g = GuidedDenoiser(rec, cond, uncond, 7.0, sigmas)
    cat, dog = enc(sd1, "a cat photo")["context"], enc(sd1, "a dog photo")["context"]
    x = torch.zeros(1, 4, 4, 4)
    for i in range(10):
        middle = (sigmas[i] * sigmas[i + 1]).sqrt() if sigmas[i + 1] > 0 else sigmas[i] / 2  # DPM2-style substep
        for s in (sigmas[i], middle, sigmas[i] * (1 + 1e-6)):
            g(x, s)
            assert torch.equal(rec.calls[-1]["context"][1:], cat if i <= 5 else dog), (i, float(s))


def test_step_from_sigma_survives_round_trips(sd1):
    schedule = make_schedule(sd1.model)
    sigmas = sigmas_for(schedule, "karras", 12)
    cond, uncond = build_conditioning(sd1, "cat", "", 12, 1, 32, 32)
    g = GuidedDenoiser(Recorder(), cond, uncond, 7.0, sigmas)
    for i in range(12):
        t = -sigmas[i].log()  # sigma -> t -> sigma, as DPM-Solver samplers do
        back = (-t).exp()
        assert g.step_of(float(back)) == i and g.step_of(float(sigmas[i]) * 0.999999) == i


def test_schedule_in_a_real_sampler(sd1):
    cond, uncond = build_conditioning(sd1, "[cat:dog:2]", "", 5, 1, 32, 32)
    sigmas = sigmas_for(make_schedule(sd1.model), "karras", 5)
    rec = Recorder()
    SAMPLERS["euler"](GuidedDenoiser(rec, cond, uncond, 5.0, sigmas), torch.zeros(1, 4, 4, 4), sigmas,
                      callback=None, noise=None)
    cat, dog = enc(sd1, "cat")["context"], enc(sd1, "dog")["context"]
    assert [torch.equal(c["context"][1:], cat) for c in rec.calls] == [True, True, True, False, False]
    assert all(torch.equal(c["context"][1:], dog) for c in rec.calls[3:])


def test_alternation_alternates(sd1):
    cond, _ = build_conditioning(sd1, "a [cat|dog]", "", 6, 1, 32, 32)
    # A1111 picks the schedule entry with step <= end, counting steps from 0: cat twice, then every step.
    assert [cond.texts_at(i)[0][0] for i in range(6)] == ["a cat", "a cat", "a dog", "a cat", "a dog", "a cat"]
    assert len(cond.encoded) == 2  # each distinct text encoded once


def test_and_weights_combine_as_a1111(sd1):
    cond, uncond = build_conditioning(sd1, "a red cat :1.5 AND a blue dog :0.5", "green", 4, 2, 32, 32)
    assert cond.texts_at(0) == [("a red cat", 1.5), ("a blue dog", 0.5)]
    inner = make_denoiser(sd1.model, make_schedule(sd1.model))
    calls = []

    def counting(x, sigma, **c):
        calls.append(x.shape[0])
        return inner(x, sigma, **c)

    sigmas = sigmas_for(make_schedule(sd1.model), "karras", 4)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 5
    got = GuidedDenoiser(counting, cond, uncond, 7.0, sigmas)(x, sigmas[1])
    assert calls == [6]  # one batched call: uncond + two parts, two images each
    one = {"context": uncond.encoded[0]["context"].expand(2, -1, -1)}
    u = inner(x, sigmas[1], **one)
    c1 = inner(x, sigmas[1], context=enc(sd1, "a red cat")["context"].expand(2, -1, -1))
    c2 = inner(x, sigmas[1], context=enc(sd1, "a blue dog")["context"].expand(2, -1, -1))
    # separate UNet calls differ from the batched one by float summation order only (~3e-6 x 7 x 2)
    assert torch.allclose(got, u + 7.0 * (1.5 * (c1 - u) + 0.5 * (c2 - u)), atol=2e-4)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("scale", [7.0, 1.0])
def test_plain_prompt_equals_cfg_denoiser(models, family, scale):
    loaded = models[family]
    model, batch = loaded.model, 2
    schedule = make_schedule(model)
    sigmas = sigmas_for(schedule, "karras", 6)
    # Each text encoded alone: SDXL's pooled projection differs in the last bit with the encoder's batch size.
    c, u = ({k: v.expand(batch, *v.shape[1:]) for k, v in
             unet_conditioning(model, encode_prompts(model, loaded.tokenizers, [t]), 32, 48).items()}
            for t in ("a red cat", "blue dog"))
    ref = CFGDenoiser(make_denoiser(model, schedule), c, u, scale)
    cond, uncond = build_conditioning(loaded, "a red cat", "blue dog", 6, batch, 32, 48)
    ours = GuidedDenoiser(make_denoiser(model, schedule), cond, uncond, scale, sigmas)
    x = torch.randn(batch, 4, 6, 4, generator=torch.Generator().manual_seed(1)) * 3
    for i in (0, 3):
        assert torch.equal(ours(x, sigmas[i]), ref(x, sigmas[i]))


def test_cond_and_uncond_padded_with_empty_chunks(sd1):
    long = " ".join(["cat"] * 80)
    empty = enc(sd1, "")["context"]
    for prompt, negative in ((long, "dog"), ("dog", long)):
        cond, uncond = build_conditioning(sd1, prompt, negative, 4, 2, 32, 32)
        rec = Recorder()
        GuidedDenoiser(rec, cond, uncond, 7.0, sigmas_for(make_schedule(sd1.model), "karras", 4))(
            torch.zeros(2, 4, 4, 4), torch.tensor(5.0))
        ctx = rec.calls[0]["context"]
        assert ctx.shape == (4, 154, 32)
        short = ctx[:2] if negative == "dog" else ctx[2:]
        assert torch.equal(short[:, :77], enc(sd1, "dog")["context"].expand(2, -1, -1))
        assert torch.equal(short[:, 77:], empty.expand(2, -1, -1))


def test_and_parts_of_different_lengths_repeat_the_last_vector(sd1):
    cond, uncond = build_conditioning(sd1, " ".join(["cat"] * 80) + " AND dog", "", 4, 1, 32, 32)
    rec = Recorder()
    GuidedDenoiser(rec, cond, uncond, 7.0, sigmas_for(make_schedule(sd1.model), "karras", 4))(
        torch.zeros(1, 4, 4, 4), torch.tensor(5.0))
    ctx = rec.calls[0]["context"]  # uncond, part 1, part 2
    dog = enc(sd1, "dog")["context"][0]
    assert ctx.shape == (3, 154, 32)
    assert torch.equal(ctx[2, :77], dog) and torch.equal(ctx[2, 77:], dog[-1:].expand(77, -1))


def test_sdxl_y_per_text(models):
    xl = models["sdxl"]
    cond, uncond = build_conditioning(xl, "[cat:dog:1]", "green", 4, 2, 32, 48)
    rec = Recorder()
    g = GuidedDenoiser(rec, cond, uncond, 7.0, sigmas_for(make_schedule(xl.model), "karras", 4))
    g(torch.zeros(2, 4, 6, 4), g.sigmas[3])
    y = rec.calls[0]["y"]
    assert y.shape == (4, xl.model.config.unet.adm_in_channels)
    for rows, text in ((slice(0, 2), "green"), (slice(2, 4), "dog")):
        want = unet_conditioning(xl.model, enc(xl, text), 32, 48)["y"]
        assert torch.equal(y[rows], want.expand(2, -1))


def test_extra_network_tags_are_not_encoded(sd1):
    cond, uncond = build_conditioning(sd1, "a cat <lora:foo:0.5>", "<lora:bar:1> dog", 4, 1, 32, 32)
    assert "<" not in cond.texts_at(0)[0][0] and "<" not in uncond.texts_at(0)[0][0]
