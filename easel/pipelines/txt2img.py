"""Text to image: encode the prompt, denoise fresh noise with a guided sampler, decode."""
from __future__ import annotations

import dataclasses

from PIL import Image

from easel.pipelines import common, plan
from easel.pipelines.refiner import refiner_for, refiner_runs
from easel.pipelines.request import GenerationRequest
from easel.samplers import SAMPLER_LABELS, SCHEDULE_LABELS
from easel.weights.model_io import LoadedModel


@dataclasses.dataclass
class GeneratedImage:
    """One image and the parameters that reproduce it."""

    image: Image.Image
    params: dict
    warnings: list[str] = dataclasses.field(default_factory=list)  # about the request (e.g. unknown prompt words)


def txt2img(loaded: LoadedModel, req: GenerationRequest, callback: plan.StepCallback | None = None, *,
            refiner: LoadedModel | None = None) -> list[GeneratedImage]:
    """Generate `n_iter` batches of `batch_size` images; seeds count up from `req.seed` (as A1111).

    With `req.refiner_checkpoint`, `refiner` (loaded from it when not given) takes over at `refiner_switch_at`.
    """
    return plan.run_batches(*prepare(loaded, req, callback, refiner=refiner))


def prepare(loaded: LoadedModel, req: GenerationRequest, callback: plan.StepCallback | None = None, *,
            refiner: LoadedModel | None = None):
    """(resolved request, batch function `(index, seeds) -> images`) of a txt2img request."""
    cfg = loaded.model.config
    req = req.resolved(cfg.default_size, cfg.default_batch)
    refiner = refiner_for(req, refiner)
    # A1111 decodes with the refiner's VAE once the refiner has run
    decoder = refiner if refiner_runs(req, req.steps, refiner) else loaded

    def batch(it: int, seeds: list[int]) -> list[GeneratedImage]:
        latents = sample_latents(loaded, req, seeds, callback, refiner, batch=it, n_iter=req.n_iter)
        return [GeneratedImage(img, image_params(loaded, req, seed))
                for img, seed in zip(common.decode(decoder.model, latents, req.tiled_vae), seeds)]
    return req, batch


def sample_latents(loaded: LoadedModel, req: GenerationRequest, seeds: list[int],
                   callback: plan.StepCallback | None = None, refiner: LoadedModel | None = None, **tags):
    """The denoised latents (B, C, H/f, W/f) of one txt2img batch of a resolved request (steps tagged `tags`)."""
    p = plan.build_plan(loaded, req, seeds, plan.request_sigmas(loaded.model, req), refiner=refiner)
    return plan.run(p.tagged(**tags), callback)


def image_params(loaded: LoadedModel, req: GenerationRequest, seed: int) -> dict:
    """The parameters stored with an image (enough to reproduce it with `easel generate --from`); fields of a
    mode or feature appear only when it is used."""
    p = {
        "mode": req.mode, "prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": req.steps,
        "sampler": req.sampler, "scheduler": req.scheduler, "sampler_label": SAMPLER_LABELS.get(req.sampler, req.sampler),
        "scheduler_label": SCHEDULE_LABELS.get(req.scheduler, req.scheduler), "cfg_scale": req.cfg_scale, "seed": seed,
        "width": req.width, "height": req.height, "clip_skip": req.clip_skip, "eta": req.eta,
        "model": loaded.name, "model_hash": loaded.hash, "dtype": req.dtype,
    }
    if req.mode != "txt2img":
        p.update(_fields(req, "denoising_strength", "resize_mode"))
    if req.mode in ("inpaint", "outpaint"):
        p.update(_fields(req, "mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                         "inpainting_mask_invert"))
    if req.mode == "outpaint":
        p.update(_fields(req, "outpaint_left", "outpaint_right", "outpaint_up", "outpaint_down"))
    if req.mode == "txt2img" and req.enable_hr:
        p.update(_fields(req, "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_denoising_strength",
                         "hr_sampler", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_resize_x", "hr_resize_y",
                         "hr_cfg_scale"))
    if req.subseed_strength > 0:
        p.update(subseed=req.subseed + (seed - req.seed), subseed_strength=req.subseed_strength)  # counts up (A1111)
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:
        p.update(_fields(req, "seed_resize_from_w", "seed_resize_from_h"))
    if req.loras:
        p["loras"] = list(req.loras)
    if req.refiner_checkpoint:
        p.update(_fields(req, "refiner_checkpoint", "refiner_switch_at"))
    from easel.pipelines.accel import params as accel_params
    p.update(accel_params(req))  # opt-in lossy accelerations, only when used
    for key in ("prompt_template", "negative_prompt_template"):  # what wildcards / {a|b} / styles were drawn from
        if (req.extra or {}).get(key):
            p[key] = req.extra[key]
    return p


def _fields(req: GenerationRequest, *names: str) -> dict:
    return {n: getattr(req, n) for n in names}
