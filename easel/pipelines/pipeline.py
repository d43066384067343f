"""The Python API: `easel.load(...)` returns a Pipeline whose methods return PIL images."""
from __future__ import annotations

import os

from PIL import Image

from easel.pipelines.networks import ActiveNetworks
from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import GeneratedImage, load_refiner, txt2img
from easel.weights.model_io import LoadedModel, load_model, save_model


class Pipeline:
    """A loaded model and the generation modes that run on it."""

    def __init__(self, loaded: LoadedModel, dtype: str = "fp32", device: str = "cpu"):
        self.loaded, self.dtype, self.device = loaded, dtype, device
        self._refiner: tuple[str, LoadedModel] | None = None  # (spec, model) of the last refiner used

    @property
    def config(self):
        """The model's ModelConfig."""
        return self.loaded.model.config

    def txt2img(self, prompt: str, negative_prompt: str = "", callback=None, **options) -> list[Image.Image]:
        """Generate images from text; options are GenerationRequest fields (steps, seed, width, ...)."""
        return [g.image for g in self.generate(GenerationRequest(prompt, negative_prompt, **options), callback)]

    def img2img(self, image: Image.Image, prompt: str, negative_prompt: str = "", callback=None,
                **options) -> list[Image.Image]:
        """Repaint an image guided by the prompt (`denoising_strength`, `resize_mode`, ... as options)."""
        req = GenerationRequest(prompt, negative_prompt, init_images=[image], **options)
        return [g.image for g in self.generate(req, callback)]

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, negative_prompt: str = "", callback=None,
                **options) -> list[Image.Image]:
        """Repaint the white part of `mask` (`mask_blur`, `inpainting_fill`, ... as options)."""
        req = GenerationRequest(prompt, negative_prompt, init_images=[image], mask=mask, **options)
        return [g.image for g in self.generate(req, callback)]

    def outpaint(self, image: Image.Image, prompt: str, left: int = 0, right: int = 0, up: int = 0, down: int = 0,
                 negative_prompt: str = "", callback=None, **options) -> list[Image.Image]:
        """Extend the image by the given pixels on each side and paint the new area."""
        if not (left or right or up or down):
            raise ValueError("outpaint needs at least one of left, right, up, down (pixels to add)")
        req = GenerationRequest(prompt, negative_prompt, init_images=[image], outpaint_left=left,
                                outpaint_right=right, outpaint_up=up, outpaint_down=down, **options)
        return [g.image for g in self.generate(req, callback)]

    def generate(self, request: GenerationRequest, callback=None, preview_sink=None) -> list[GeneratedImage]:
        """Run a request by its mode (txt2img, hires fix, img2img, inpaint, outpaint); each result carries the
        parameters that reproduce it.

        `callback(d)` sees every step ({i, x, sigma, denoised, steps, batch, ...}); with `request.preview_every`
        = N > 0 every N-th step's dict also has d['preview'], a list of PIL images (`preview_mode` 'approx':
        the latent -> RGB map, 'full': the VAE), which `preview_sink(step, images)` receives as well.
        The request's LoRAs (prompt tags and `loras`) are merged into every model used for the run only.
        """
        request.dtype, request.device = self.dtype, self.device
        run = run_mode(request.mode, request.enable_hr)
        networks = ActiveNetworks(request)  # an unknown LoRA fails here, before a refiner is loaded
        options = {}
        if request.refiner_checkpoint:
            if request.mode not in ("txt2img", "img2img"):
                raise ValueError(f"a refiner (refiner_checkpoint) works with txt2img, hires fix and img2img, not "
                                 f"{request.mode}: leave it empty")
            options["refiner"] = self.refiner(request.refiner_checkpoint)
        step = with_previews(self.loaded, request, callback, preview_sink)
        with networks.applied([self.loaded, *options.values()]):
            results = run(self.loaded, request, step, **options)
        extra = networks.params()
        for r in results:
            r.params.update(extra)
        return results

    def refiner(self, spec: str) -> LoadedModel:
        """The refiner model `spec` (path or name), loaded once and kept for the next requests."""
        cached = self._refiner
        if cached is None or cached[0] != spec:
            self._refiner = None  # let go of the previous one before loading the next
            self._refiner = (spec, load_refiner(spec, self.dtype, self.device))
        return self._refiner[1]

    def save(self, dst: str | os.PathLike, to: str = "single-file"):
        """Write the model as a single `.safetensors` file (with its live-preview map) or a diffusers folder."""
        extra = None
        if to == "single-file":
            from easel.pipelines.preview import latent_rgb_metadata
            extra = latent_rgb_metadata(self.loaded)
        return save_model(self.loaded, dst, to, extra_metadata=extra)


def with_previews(loaded: LoadedModel, req: GenerationRequest, callback=None, sink=None):
    """The step callback with live previews every `req.preview_every` steps: d['preview'] (PIL images) is set
    before `callback(d)` runs, and `sink(step, images)` gets them too; `callback` itself when previews are off."""
    if req.preview_every <= 0:
        return callback
    from easel.pipelines.preview import preview_callback
    frames = []
    render = preview_callback(loaded, req.preview_every, req.preview_mode, lambda step, ims: frames.append(ims))

    def step(d: dict) -> None:
        render(d)
        if frames:
            d = {**d, "preview": frames.pop()}
            if sink is not None:
                sink(d["i"] + 1, d["preview"])
        if callback is not None:
            callback(d)
    return step


def run_mode(mode: str, enable_hr: bool = False):
    """The function `(loaded, req, callback) -> list[GeneratedImage]` that runs a mode (imported when needed);
    txt2img, hires and img2img also take `refiner=LoadedModel`."""
    if mode == "txt2img" and enable_hr:
        from easel.pipelines.hires import hires
        return hires
    if mode == "txt2img":
        return txt2img
    if mode == "img2img":
        from easel.pipelines.img2img import img2img
        return img2img
    if mode == "inpaint":
        from easel.pipelines.inpaint import inpaint
        return inpaint
    if mode == "outpaint":
        from easel.pipelines.outpaint import outpaint
        return outpaint
    raise ValueError(f"unknown mode {mode!r}; choose one of txt2img, img2img, inpaint, outpaint")


def load(path_or_id: str | os.PathLike | None = None, dtype: str = "fp32", device: str = "cpu",
         vae: str | None = None, tokenizer: str | None = None, prediction: str | None = None) -> Pipeline:
    """Load a model (single file, diffusers folder or hub id) into a Pipeline."""
    from easel.weights.registry import resolve_model
    source = resolve_model(path_or_id)
    return Pipeline(load_model(source, dtype, device, vae=vae, tokenizer=tokenizer, prediction=prediction), dtype, device)
