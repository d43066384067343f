"""Names of the sub-folders of a model folder that hold other kinds of weights (no torch: the CLI parser reads
them). Files in them are not Stable Diffusion checkpoints, so `easel models` skips them."""
from __future__ import annotations

# Upscaler files: easel's, ComfyUI's (upscale_models) and A1111's folder names.
UPSCALER_FOLDERS = ("upscalers", "upscale_models", "ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "ScuNET")
CONTROLNET_FOLDERS = ("ControlNet", "controlnet")
OTHER_FOLDERS = ("lora", "loras", "vae", "embeddings")


def not_checkpoint_folders() -> set[str]:
    """Lower-case folder names whose files are never checkpoints."""
    return {f.lower() for f in (*UPSCALER_FOLDERS, *CONTROLNET_FOLDERS, *OTHER_FOLDERS)}
