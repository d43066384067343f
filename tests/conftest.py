"""Shared fixtures: a tiny BPE vocabulary and tiny random-weight models in the real SD layouts."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from easel.models.configs import SD15, SD21, SDXL, SDXL_REFINER, CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig

TINY_WORDS = ["a", "red", "blue", "cat", "dog", "photo", "of", "the", "star", "circle", "green", "big", "small"]


def byte_chars() -> list[str]:
    """CLIP's byte -> unicode table, in its order (printable bytes first, then 256 + n)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_vocab(folder) -> tuple[str, str]:
    """A small but complete byte-level BPE vocabulary (vocab.json + merges.txt) that HF's CLIPTokenizer reads."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in TINY_WORDS:  # merge each word left to right, the last merge carrying </w>
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    (folder / "vocab.json").write_text(json.dumps(ids))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def tiny_vocab_size(folder) -> int:
    return len(json.loads((folder / "vocab.json").read_text()))


def tiny_config(family: str, vocab_size: int) -> ModelConfig:
    """A reduced config of the same architecture as SD1 / SD2 / SDXL / the SDXL refiner, or an SD1 inpainting
    model ("sd1-inpaint": 9 UNet input channels) (random weights, fast on CPU)."""
    eos = vocab_size - 1
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=2, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos)
    vae = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=32)
    if family == "sd1-inpaint":
        cfg = tiny_config("sd1", vocab_size)
        return dataclasses.replace(cfg, name="tiny-sd1-inpaint", unet=dataclasses.replace(cfg.unet, in_channels=9))
    if family == "sdxl-refiner":
        return _tiny_refiner_config(text, vae)
    if family == "sd1":
        unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                          num_heads=2, context_dim=32)
        return dataclasses.replace(SD15, name="tiny-sd1", unet=unet, vae=vae, text_encoders=(text,), default_size=32)
    if family == "sd2":
        text = dataclasses.replace(text, hidden_act="gelu", projection_dim=32, pad_token_id=0)
        unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                          num_heads=-1, num_head_channels=16, context_dim=32, use_linear_in_transformer=True)
        return dataclasses.replace(SD21, name="tiny-sd2", unet=unet, vae=vae, text_encoders=(text,), default_size=32)
    text2 = dataclasses.replace(text, hidden_act="gelu", projection_dim=32, pad_token_id=0, hidden_size=32)
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                      transformer_depth_middle=1, num_heads=-1, num_head_channels=16, context_dim=64,
                      use_linear_in_transformer=True, adm_in_channels=32 + 6 * 256)
    return dataclasses.replace(SDXL, name="tiny-sdxl", unet=unet, vae=vae, text_encoders=(text, text2), default_size=32)


def _tiny_refiner_config(text: CLIPTextConfig, vae: VAEConfig) -> ModelConfig:
    """A reduced SDXL refiner: one OpenCLIP-style encoder with projection, y = pooled + 5 x 256, no attention at
    the outer levels (as the real refiner's (0, 4, 4, 0))."""
    text = dataclasses.replace(text, hidden_act="gelu", projection_dim=32, pad_token_id=0)
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 0),
                      transformer_depth_middle=1, num_heads=-1, num_head_channels=16, context_dim=32,
                      use_linear_in_transformer=True, adm_in_channels=32 + 5 * 256)
    vae = dataclasses.replace(vae, scale_factor=0.13025)
    return dataclasses.replace(SDXL_REFINER, name="tiny-sdxl-refiner", unet=unet, vae=vae, text_encoders=(text,),
                               default_size=32)


def random_model(cfg, seed: int = 0):
    """A StableDiffusion of `cfg` with random weights, seeded; the zero-initialised layers get small random values
    too (zero output convs would make every UNet output 0)."""
    from easel.models.sd import StableDiffusion
    torch.manual_seed(seed)
    model = StableDiffusion(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and float(p.abs().max()) == 0:
                p.normal_(0, 0.05)
    return model


def make_tiny(tmp_path, family: str = "sd1", seed: int = 0):
    """A LoadedModel of `tiny_config(family)` with random weights (std widened so outputs are not trivially tiny)
    and its tokenizers."""
    from easel.text.tokenizer import CLIPTokenizer
    from easel.weights.model_io import LoadedModel
    tok_dir = tmp_path / "tok"
    vocab, merges = write_tiny_vocab(tok_dir)
    cfg = tiny_config(family, tiny_vocab_size(tok_dir))
    model = random_model(cfg, seed)
    # OpenCLIP-based encoders pad with "!" (id 0 in CLIP's vocabulary and in ours), OpenAI CLIP with <|endoftext|>.
    toks = [CLIPTokenizer.from_files(vocab, merges, pad_token="!" if enc.pad_token_id == 0 else "<|endoftext|>")
            for enc in cfg.text_encoders]
    return LoadedModel(model, toks, "", "")


def _single_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy 2-core machine an OpenMP barrier waiting
    for a descheduled thread makes them 10-100x slower; golden images are also defined at one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


one_thread = pytest.fixture(_single_thread)
one_thread_module = pytest.fixture(scope="module")(_single_thread)


@pytest.fixture
def tiny_sd1(tmp_path):
    return make_tiny(tmp_path, "sd1")


@pytest.fixture(scope="session")
def tiny_sd1_file(tmp_path_factory):
    """A tiny SD1-layout model saved as a single .safetensors (tokenizer folder beside it)."""
    from easel.weights.model_io import save_model
    d = tmp_path_factory.mktemp("tiny_sd1")
    loaded = make_tiny(d, "sd1")
    return save_model(loaded, d / "tiny-sd1.safetensors")
