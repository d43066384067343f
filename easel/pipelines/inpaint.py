"""Inpainting: repaint the white part of a mask, keep the rest pixel for pixel (A1111's img2img "inpaint").

The steps, each a small function:
1. `prepare_inputs`: mask to L, inverted and blurred; the working images at the processing size (the
   whole image, or with `inpaint_full_res` a crop around the mask at full resolution); the masked
   content pre-filled; VAE latents; the latent blend mask; for 9-channel inpainting UNets the
   mask + masked-image latents they take as extra input channels.
2. `inpaint_plan`: the img2img sampling plan (SDEdit from the noised latent at `denoising_strength`) with an
   inpainting wrapper: `InpaintBlend` pins the unmasked latent at every step for ordinary models,
   `ConcatInpaint` feeds the mask to inpainting models.
3. `finish`: decode and paste back through the feathered mask, so that every pixel outside the blurred
   mask equals the input image exactly.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from easel.pipelines import common, images, plan
from easel.pipelines.img2img import resolve_edit_request
from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import GeneratedImage, image_params
from easel.samplers.inpaint import ConcatInpaint, InpaintBlend
from easel.weights.model_io import LoadedModel


@dataclasses.dataclass
class InpaintInputs:
    """Everything about the images and the mask that does not depend on the seed."""

    originals: list[Image.Image]  # what the results are pasted onto (the input at the processing size, or native)
    overlay: Image.Image  # paste-back alpha (L, size of `originals`): 0 = keep the original pixel
    region: images.Region | None  # "only masked": the box of the original that was processed
    work_mask: Image.Image  # the blurred mask at the processing size
    init_latent: torch.Tensor  # (1 or B, C, h, w) latents of the (pre-filled) working images
    latent_mask: torch.Tensor  # (1, 1, h, w), 1 = repaint
    c_concat: torch.Tensor | None  # (1 or B, 5, h, w) for 9-channel inpainting UNets, else None


def inpaint(loaded: LoadedModel, req: GenerationRequest, callback: plan.StepCallback | None = None
            ) -> list[GeneratedImage]:
    """Repaint the masked part of `req.init_images` (white = repaint) guided by the prompt; `n_iter` batches of
    `batch_size` images, seeds counting up from `req.seed`."""
    return plan.run_batches(*prepare(loaded, req, callback))


def prepare(loaded: LoadedModel, req: GenerationRequest, callback: plan.StepCallback | None = None):
    """(resolved request, batch function) of an inpainting request."""
    if req.mask is None:
        raise ValueError("inpaint needs a mask (white = repaint): set mask (CLI: --mask MASK.png)")
    req = resolve_edit_request(loaded, req)
    return req, batch_function(loaded, req, prepare_inputs(loaded, req), callback)


def batch_function(loaded: LoadedModel, req: GenerationRequest, inputs: InpaintInputs,
                   callback: plan.StepCallback | None = None):
    """The batch function that samples, decodes and pastes back (shared with outpainting)."""
    sigmas = plan.img2img_sigmas(plan.request_sigmas(loaded.model, req), req.denoising_strength)

    def batch(it: int, seeds: list[int]) -> list[GeneratedImage]:
        p = inpaint_plan(loaded, req, inputs, seeds, sigmas)
        latents = plan.run(p.tagged(batch=it, n_iter=req.n_iter), callback)
        # Known latents back in exactly (A1111 does the same), so the decode around the seam sees the original.
        m = inputs.latent_mask.to(latents.device)
        latents = latents * m + p.latent * (1 - m)
        decoded = common.decode(loaded.model, latents, req.tiled_vae)
        return [GeneratedImage(finish(inputs, img, i), image_params(loaded, req, seed))
                for i, (img, seed) in enumerate(zip(decoded, seeds))]
    return batch


def prepare_inputs(loaded: LoadedModel, req: GenerationRequest) -> InpaintInputs:
    """Mask, working images, latents and (inpainting models) the concat conditioning of a resolved request."""
    sources = _source_images(req)
    mask = images.prepare_mask(_mask_at(req.mask, sources[0].size), blur=req.mask_blur,
                               invert=req.inpainting_mask_invert)
    region = None
    if req.inpaint_full_res:
        box = images.mask_crop_region(mask, req.inpaint_full_res_padding)
        region = images.expand_to_aspect(box, req.width, req.height, mask.width, mask.height)
        work_mask = images.crop_for_region(mask, region, req.width, req.height)
        work = [images.crop_for_region(im, region, req.width, req.height) for im in sources]
        originals, overlay = sources, mask
    else:
        images.mask_crop_region(mask)  # raises a clear error for an empty mask
        work_mask = images.resize_image(mask, req.width, req.height, req.resize_mode)
        work = [images.resize_image(im, req.width, req.height, req.resize_mode) for im in sources]
        originals, overlay = work, images.overlay_alpha(work_mask)
    if req.inpainting_fill != "original":  # A1111 pre-fills the hole for every mode but "original"
        work = [images.fill_masked(im, work_mask) for im in work]
    model = loaded.model
    init = common.encode(model, work, req.tiled_vae)
    lmask = images.latent_mask(work_mask, init.shape[2], init.shape[3]).to(init.device)
    if req.inpainting_fill == "latent_nothing":
        init = init * (1 - lmask)
    c_concat = concat_conditioning(loaded, work, work_mask, init.shape[-2:]) if model.config.is_inpaint else None
    return InpaintInputs(originals, overlay, region, work_mask, init, lmask, c_concat)


def _source_images(req: GenerationRequest) -> list[Image.Image]:
    """The init images as RGB, all at the first one's size (one per batch item, or one for the whole batch)."""
    if len(req.init_images) not in (1, req.batch_size):
        raise ValueError(f"got {len(req.init_images)} init images for a batch of {req.batch_size}: "
                         "give one image (used for every image of the batch) or one per image")
    size = req.init_images[0].size
    return [im.convert("RGB") if im.size == size else images.resize_image(im.convert("RGB"), *size)
            for im in req.init_images]


def _mask_at(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The user's mask at the image's size (a mask drawn at another resolution is stretched onto it)."""
    return mask if mask.size == size else images.resize_image(images.binary_mask(mask), *size)


@torch.no_grad()
def concat_conditioning(loaded: LoadedModel, work: list[Image.Image], work_mask: Image.Image,
                        latent_hw: tuple[int, int]) -> torch.Tensor:
    """The extra input of a 9-channel inpainting UNet: the mask on the latent grid (1 channel) and the latents
    of the image with the masked part set to 0 (mid grey) (4 channels); the mask is rounded at one half."""
    model = loaded.model
    m = images.mask_tensor(work_mask)  # (1, 1, H, W) of 0/1
    masked = common.from_pil(work) * (1 - m)  # (N, 3, H, W) in [-1, 1]
    vae_dtype = next(model.vae.parameters()).dtype
    masked_latent = model.vae.encode_latents(masked.to(model.device, vae_dtype)).float()
    small = F.interpolate(m, size=tuple(latent_hw), mode="nearest").to(masked_latent.device)  # (1, 1, h, w)
    return torch.cat([small.expand(masked_latent.shape[0], -1, -1, -1), masked_latent], dim=1)


def inpaint_plan(loaded: LoadedModel, req: GenerationRequest, inputs: InpaintInputs, seeds: list[int],
                 sigmas: torch.Tensor) -> plan.SamplingPlan:
    """The plan of one batch: img2img from the (filled) init latents, with the mask fed to an inpainting UNet as
    input channels, or for an ordinary UNet the known latents pinned around the guided denoiser at every step."""
    init = inputs.init_latent.to(loaded.model.device)
    lmask = inputs.latent_mask.to(init.device)
    if req.inpainting_fill == "latent_noise":
        init = init * (1 - lmask) + fill_noise(seeds, tuple(init.shape[1:])).to(init.device) * lmask
    if inputs.c_concat is not None:  # inpainting UNet: the mask goes in as input channels, around the network
        concat = lambda unet: ConcatInpaint(unet, inputs.c_concat)  # noqa: E731
        return plan.build_plan(loaded, req, seeds, sigmas, init, wrap_unet=concat)
    p = plan.build_plan(loaded, req, seeds, sigmas, init)
    return p.wrap(lambda guided: InpaintBlend(guided, p.latent, lmask, p.noise)) if p.steps else p


def fill_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Unit noise (B, *shape) for the "latent noise" fill, one stream per seed, independent of the sampling noise
    and of ancestral samplers' later draws (A1111 reuses the sampling noise itself, which doubles it up)."""
    streams = [int(np.random.SeedSequence([int(s), 0x1A7E]).generate_state(1, np.uint64)[0] >> 1) for s in seeds]
    return common.initial_noise(streams, shape)[0]


def finish(inputs: InpaintInputs, generated: Image.Image, index: int = 0) -> Image.Image:
    """Paste a decoded image back onto its original through the feathered mask."""
    original = inputs.originals[index % len(inputs.originals)]
    return images.paste_back(original, generated, inputs.overlay, inputs.region)


def changed_outside(original: Image.Image, result: Image.Image, mask: Image.Image) -> int:
    """Largest pixel difference (0-255) between two images where `mask` is 0: 0 when inpainting kept them."""
    keep = np.asarray(mask.convert("L")) == 0
    diff = np.abs(np.asarray(original.convert("RGB"), dtype=int) - np.asarray(result.convert("RGB"), dtype=int))
    return int(diff[keep].max()) if keep.any() else 0
