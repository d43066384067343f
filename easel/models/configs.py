"""Frozen dataclass configs for the three networks and the named model presets.

Field names follow the original CompVis/SGM yaml configs (`model_channels`, `channel_mult`,
`num_res_blocks`, `context_dim`, ...), so a reader can hold them side by side.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer (HF `CLIPTextModel` layout; OpenCLIP checkpoints are mapped onto it)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # OpenAI CLIP: quick_gelu; OpenCLIP ViT-H / bigG: gelu
    layer_norm_eps: float = 1e-5
    projection_dim: int = 0  # 0: no `text_projection` (SD1); >0: projected pooled output
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407  # SD1 pads with <|endoftext|>; OpenCLIP-based encoders pad with "!" (0)


@dataclass(frozen=True)
class UNetConfig:
    """Denoising UNet (CompVis `openaimodel.UNetModel` / SGM layout)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Transformer blocks per level (0 = no attention at that level), and in the middle block.
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    num_heads: int = 8  # used when num_head_channels == -1 (SD1)
    num_head_channels: int = -1  # SD2/SDXL fix the head width (64) instead of the count
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD1: 1x1 conv proj_in/out; SD2/SDXL: linear
    adm_in_channels: int = 0  # SDXL: 2816 = pooled text (1280) + 6 size/crop embeddings x 256
    norm_groups: int = 32

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) for a transformer with `channels` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (CompVis `ddconfig` + `embed_dim`) and the latent scale factor."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215
    shift_factor: float = 0.0

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along one side."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ModelConfig:
    """A whole Stable Diffusion model: the three networks and how they are wired together."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[CLIPTextConfig, ...]
    prediction: str = "eps"  # "eps" or "v"
    # Which hidden layer feeds the UNet, counted from the end (1 = last, 2 = penultimate), and
    # whether the final layer norm is applied to it (SD1/SD2 yes, SDXL no).
    clip_skip: int = 1
    text_final_norm: bool = True
    pooled_text: bool = False  # SDXL: pooled output of the last encoder goes into the UNet's `y`
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    default_size: int = 512
    default_batch: int = 1

    @property
    def is_inpaint(self) -> bool:
        """True for 9-channel inpainting UNets (latent + mask + masked-image latent)."""
        return self.unet.in_channels == 9

    def to_json(self) -> str:
        """Serialise for safetensors metadata."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "ModelConfig":
        """Inverse of `to_json`."""
        d = json.loads(text)
        tup = lambda c: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}  # noqa: E731
        return ModelConfig(
            **{k: v for k, v in d.items() if k not in ("unet", "vae", "text_encoders")},
            unet=UNetConfig(**tup(d["unet"])),
            vae=VAEConfig(**tup(d["vae"])),
            text_encoders=tuple(CLIPTextConfig(**tup(c)) for c in d["text_encoders"]),
        )


CLIP_L = CLIPTextConfig()
OPENCLIP_H = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, hidden_act="gelu", projection_dim=1024, pad_token_id=0)
OPENCLIP_BIGG = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, hidden_act="gelu", projection_dim=1280, pad_token_id=0)

SD15 = ModelConfig(name="sd15", unet=UNetConfig(), vae=VAEConfig(), text_encoders=(CLIP_L,))
SD15_INPAINT = dataclasses.replace(SD15, name="sd15-inpaint", unet=UNetConfig(in_channels=9))
SD21 = ModelConfig(
    name="sd21", prediction="v", default_size=768, clip_skip=2,
    unet=UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    vae=VAEConfig(), text_encoders=(OPENCLIP_H,),
)
SD21_BASE = dataclasses.replace(SD21, name="sd21-base", prediction="eps", default_size=512)
SDXL = ModelConfig(
    name="sdxl", default_size=1024, clip_skip=2, text_final_norm=False, pooled_text=True,
    unet=UNetConfig(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                    num_heads=-1, num_head_channels=64, context_dim=2048, use_linear_in_transformer=True,
                    adm_in_channels=2816),
    vae=VAEConfig(scale_factor=0.13025), text_encoders=(CLIP_L, OPENCLIP_BIGG),
)

# The SDXL refiner (SGM `sd_xl_refiner.yaml`): OpenCLIP bigG alone, penultimate layer as context (1280), and
# y = pooled text (1280) + 5 x 256 (original size, crop, aesthetic score; no target size) = 2560.
SDXL_REFINER = ModelConfig(
    name="sdxl-refiner", default_size=1024, clip_skip=2, text_final_norm=False, pooled_text=True,
    unet=UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0),
                    transformer_depth_middle=4, num_heads=-1, num_head_channels=64, context_dim=1280,
                    use_linear_in_transformer=True, adm_in_channels=2560),
    vae=VAEConfig(scale_factor=0.13025), text_encoders=(OPENCLIP_BIGG,),
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SD15, SD15_INPAINT, SD21, SD21_BASE, SDXL, SDXL_REFINER)}
