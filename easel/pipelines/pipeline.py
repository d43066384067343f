"""The Python API: `easel.load(...)` returns a Pipeline whose methods return PIL images."""
from __future__ import annotations

import dataclasses

import logging
import os

from PIL import Image

from easel.pipelines import common, conditioning, plan
from easel.pipelines.networks import ActiveNetworks
from easel.pipelines.refiner import load_refiner
from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import GeneratedImage
from easel.weights.model_io import LoadedModel, load_model, save_model


log = logging.getLogger(__name__)
_WARNED: set[tuple[str, tuple[str, ...]]] = set()  # (model hash, unknown words) already logged


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

    def generate(self, request: GenerationRequest, callback=None, preview_sink=None, *, on_batch=None,
                 should_stop=None, extend_plan=None) -> list[GeneratedImage]:
        """Run a request by its mode (txt2img, hires fix, img2img, inpaint, outpaint); each result carries the
        parameters that reproduce it.

        `callback(d)` sees every step ({i, x, sigma, denoised, steps, batch, ...}); with `request.preview_every`
        = N > 0 every N-th step's dict also has d['preview'], a list of PIL images (`preview_mode` 'approx':
        the latent -> RGB map, 'full': the VAE), which `preview_sink(step, images)` receives as well.
        `on_batch(images)` gets each batch as soon as it is finished (to save it before the next one runs);
        `should_stop()` is polled between VAE tiles, so that a cancel also stops a long decode.
        `extend_plan(plan, loaded) -> plan` is applied to every sampling plan the request builds (observe steps,
        wrap the denoiser: see easel.pipelines.plan.extending).
        The request's LoRAs (prompt tags and `loras`) are merged into every model used for the run only.
        """
        request.dtype, request.device = self.dtype, self.device
        if request.draws_per_image:  # wildcards / {a|b}: each image draws its prompt from its own seed
            request = dataclasses.replace(request)
            request.fix_seeds()
            return [image for one in request.per_image(self.config.default_batch)
                    for image in self.generate(one, callback, preview_sink, on_batch=on_batch, should_stop=should_stop,
                                               extend_plan=extend_plan)]
        request = request.expanded()  # LoRA tags and word warnings read the prompt the images are made from
        prepare = mode_preparer(request.mode, request.enable_hr)
        networks = ActiveNetworks(request)  # an unknown LoRA fails here, before a refiner is loaded
        options = {}
        if request.refiner_checkpoint:
            if request.mode not in ("txt2img", "img2img"):
                raise ValueError(f"a refiner (refiner_checkpoint) works with txt2img, hires fix and img2img, not "
                                 f"{request.mode}: leave it empty")
            options["refiner"] = self.refiner(request.refiner_checkpoint)
        step = with_previews(self.loaded, request, callback, preview_sink)
        ti_hashes, warnings = prompt_report(self.loaded, request, with_loras=bool(networks.request.loras))
        extensions = () if extend_plan is None else (extend_plan,)
        control_params = {}
        if request.controlnets:  # loaded (and checked against the model) before anything samples
            from easel.pipelines.control import ControlSet
            controls = ControlSet.for_request(self.loaded, request)
            extensions, control_params = (*extensions, controls.extend), controls.params()

        def finished(batch: list[GeneratedImage]) -> None:
            extra = {**networks.params(), **control_params}  # known once the networks are applied
            for r in batch:
                r.params.update(extra)
                if ti_hashes:
                    r.params["ti_hashes"] = ti_hashes
                r.warnings = warnings
            if on_batch is not None:
                on_batch(batch)
        with networks.applied([self.loaded, *options.values()]), common.stop_check(should_stop), \
                plan.extending(*extensions):
            return plan.run_batches(*prepare(self.loaded, request, step, **options), on_batch=finished)

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


def prompt_report(loaded: LoadedModel, req: GenerationRequest,
                  with_loras: bool = False) -> tuple[dict[str, str], list[str]]:
    """({embedding name: A1111 short hash} of the embeddings the prompts use, warnings about the prompts): a word
    the model never saw is named (and logged, once per model and words) rather than silently drawn as whatever its
    byte tokens mean. With LoRAs applied nothing is said: a LoRA may have taught the model those words."""
    from easel.weights.load import file_sha256
    texts = [t for p in (req.prompt, req.negative_prompt, req.hr_prompt or "", req.hr_negative_prompt or "")
             for t in conditioning.prompt_texts(p, req.steps)]
    library = common.embedding_library(loaded)
    tokenizer = loaded.tokenizers[0]
    used = conditioning.embeddings_used(tokenizer, library, texts)
    warnings = []
    vocabulary = conditioning.model_vocabulary(loaded.source)
    unknown = [] if with_loras else conditioning.unknown_words(tokenizer, texts, known=set(used), vocabulary=vocabulary)
    if unknown:
        warnings.append(f"the model {loaded.name!r} was never trained on these words, so they steer nothing it "
                        f"knows: {', '.join(unknown)}")
        if (loaded.hash, tuple(unknown)) not in _WARNED:  # a training run's sample prompts repeat every N steps
            _WARNED.add((loaded.hash, tuple(unknown)))
            log.warning(warnings[-1])
    # A1111's TI hash: the first 12 hex digits of the embedding file's sha256
    return {name: file_sha256(library.path(name))[:12] for name in used}, warnings


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


def mode_preparer(mode: str, enable_hr: bool = False):
    """The `prepare(loaded, req, callback) -> (resolved request, batch function)` of a mode (imported when needed);
    txt2img, hires and img2img also take `refiner=LoadedModel`."""
    if mode == "txt2img" and enable_hr:
        from easel.pipelines.hires import prepare
    elif mode == "txt2img":
        from easel.pipelines.txt2img import prepare
    elif mode == "img2img":
        from easel.pipelines.img2img import prepare
    elif mode == "inpaint":
        from easel.pipelines.inpaint import prepare
    elif mode == "outpaint":
        from easel.pipelines.outpaint import prepare
    else:
        raise ValueError(f"unknown mode {mode!r}; choose one of txt2img, img2img, inpaint, outpaint")
    return prepare


def load(path_or_id: str | os.PathLike | None = None, dtype: str = "fp32", device: str = "cpu",
         vae: str | None = None, tokenizer: str | None = None, prediction: str | None = None) -> Pipeline:
    """Load a model (single file, diffusers folder or hub id) into a Pipeline."""
    from easel.weights.registry import resolve_model
    source = resolve_model(path_or_id)
    return Pipeline(load_model(source, dtype, device, vae=vae, tokenizer=tokenizer, prediction=prediction), dtype, device)
