"""The ShapeWorld model: an SD1-layout Stable Diffusion small enough to train on two CPU cores.

Sizes follow throughput and quality measurements of a prototype on a 2-core CPU: a (16, 32, 64) VAE with 4x
downsampling (64 px images -> 16x16x4 latents), a (32, 64, 128) UNet with cross-attention at 16x16 and 8x8 and in
the 4x4 middle block (more updates beat more parameters at this budget; attention at 16x16 instead of the 4x4
level gives per-word maps twice as fine and costs ~40% more time per sampling call, measured alternately against
the first model's 8x8 + 4x4), and a 4-layer, 128-wide CLIP text encoder over a ~700-token
vocabulary (English words and Chinese characters). eps-prediction with SD's scaled-linear betas, as the prototype that was measured.
"""
from __future__ import annotations

import dataclasses

from easel.models.clip_vision import CLIPVisionConfig
from easel.models.configs import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig

# The shipped model's tokenizer: the first model's 628 English tokens + 76 for the 43 Chinese characters. The
# real size always comes from the trained tokenizer via `shapeworld_config`.
SHAPEWORLD_VOCAB = 704
IMAGE_SIZE = 64

SHAPEWORLD_TEXT = CLIPTextConfig(
    vocab_size=SHAPEWORLD_VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=0,
    bos_token_id=SHAPEWORLD_VOCAB - 2, eos_token_id=SHAPEWORLD_VOCAB - 1, pad_token_id=SHAPEWORLD_VOCAB - 1)
SHAPEWORLD_VAE = VAEConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=4,
                           norm_groups=8, scale_factor=1.0)
SHAPEWORLD_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                             transformer_depth=(1, 1, 0), transformer_depth_middle=1, num_heads=4,
                             context_dim=128, use_linear_in_transformer=False, norm_groups=32)
SHAPEWORLD = ModelConfig(name="shapeworld", unet=SHAPEWORLD_UNET, vae=SHAPEWORLD_VAE,
                         text_encoders=(SHAPEWORLD_TEXT,), prediction="eps", default_size=IMAGE_SIZE,
                         default_batch=4)
SHAPEWORLD_VISION = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=128, intermediate_size=512,
                                     num_hidden_layers=4, num_attention_heads=4, projection_dim=128)

# Tiny versions of the same architecture for tests and smoke runs.
TINY_TEXT = dataclasses.replace(SHAPEWORLD_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2)
TINY_VAE = dataclasses.replace(SHAPEWORLD_VAE, ch=8, ch_mult=(1, 2), norm_groups=4)
TINY_UNET = dataclasses.replace(SHAPEWORLD_UNET, model_channels=16, channel_mult=(1, 2), transformer_depth=(0, 1),
                                num_heads=2, context_dim=32, norm_groups=8)
TINY_VISION = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
TINY = ModelConfig(name="shapeworld-tiny", unet=TINY_UNET, vae=TINY_VAE, text_encoders=(TINY_TEXT,),
                   default_size=32)

MODEL_PRESETS = {"shapeworld": SHAPEWORLD, "tiny": TINY}
VISION_PRESETS = {"shapeworld": SHAPEWORLD_VISION, "tiny": TINY_VISION}


def text_config_for(base: CLIPTextConfig, vocab_size: int) -> CLIPTextConfig:
    """The text config with the trained tokenizer's vocabulary size and its special-token ids."""
    return dataclasses.replace(base, vocab_size=vocab_size, bos_token_id=vocab_size - 2,
                               eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def shapeworld_config(vocab_size: int, scale_factor: float, base: ModelConfig = SHAPEWORLD) -> ModelConfig:
    """The preset completed with what training measured: the vocabulary size and the latent scale."""
    text = text_config_for(base.text_encoders[0], vocab_size)
    unet = dataclasses.replace(base.unet, context_dim=text.hidden_size)
    vae = dataclasses.replace(base.vae, scale_factor=scale_factor)
    return dataclasses.replace(base, text_encoders=(text,), unet=unet, vae=vae)
