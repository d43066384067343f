"""The Python API: `easel.load(...)` returns a Pipeline whose methods return PIL images."""
from __future__ import annotations

import os

from PIL import Image

from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import GeneratedImage, txt2img
from easel.weights.model_io import LoadedModel, load_model, save_model


class Pipeline:
    """A loaded model and the generation modes that run on it."""

    def __init__(self, loaded: LoadedModel, dtype: str = "fp32", device: str = "cpu"):
        self.loaded, self.dtype, self.device = loaded, dtype, device

    @property
    def config(self):
        """The model's ModelConfig."""
        return self.loaded.model.config

    def txt2img(self, prompt: str, negative_prompt: str = "", callback=None, **options) -> list[Image.Image]:
        """Generate images from text; options are GenerationRequest fields (steps, seed, width, ...)."""
        return [g.image for g in self.generate(GenerationRequest(prompt, negative_prompt, **options), callback)]

    def generate(self, request: GenerationRequest, callback=None) -> list[GeneratedImage]:
        """Run a request; each result carries the parameters that reproduce it."""
        request.dtype, request.device = self.dtype, self.device
        return txt2img(self.loaded, request, callback)

    def save(self, dst: str | os.PathLike, to: str = "single-file"):
        """Write the model as a single `.safetensors` file or a diffusers folder."""
        return save_model(self.loaded, dst, to)


def load(path_or_id: str | os.PathLike | None = None, dtype: str = "fp32", device: str = "cpu",
         vae: str | None = None, tokenizer: str | None = None, prediction: str | None = None) -> Pipeline:
    """Load a model (single file, diffusers folder or hub id) into a Pipeline."""
    from easel.weights.registry import resolve_model
    source = resolve_model(path_or_id)
    return Pipeline(load_model(source, dtype, device, vae=vae, tokenizer=tokenizer, prediction=prediction), dtype, device)
