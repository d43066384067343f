"""ControlNets during sampling, added to every plan a request builds (txt2img, both hires passes, img2img, inpaint).

`ControlSet.extend` is a plan extension (`easel.pipelines.plan.extending`): on each plan it
1. prepares each unit's hint at the plan's size (the control image fitted with the unit's resize mode, then
   preprocessed), and
2. wraps the denoiser stack twice: `StepTracker` on top records the step and the batch size of each call, and the
   network call under the eps/v wrapper (the UNet, after a 9-channel model's extra inputs) becomes
   `ControlledUNet`, which runs every active ControlNet on the same input and adds their scaled residuals to the
   UNet's skip connections and middle block.

A1111's (sd-webui-controlnet's) rules, kept exactly:
- a unit runs at step i of n when guidance_start <= i / n <= guidance_end, and not at all at weight 0 (so the image
  is bit for bit the one without it);
- "balanced" scales all residuals by the weight, on both halves of the guidance batch;
- "My prompt is more important" (`prompt`, its soft injection) scales residual k of N by weight * 0.825 ** (N-1-k)
  (the middle block's by the weight, the first skip's by 0.825 ** 12 on SD1/SD2), still on both halves;
- "ControlNet is more important" (`control`, soft injection + CFG injection) uses the same decaying scales on the
  prompt half only: the negative prompt's prediction runs without ControlNet, so guidance pushes towards it;
- a global-pooling ControlNet (1.1 shuffle) also acts on the prompt half only;
- in a hires fix's second pass a canny unit always gets the decaying scales (sd-webui-controlnet forces them there).
The guidance batch is (negative prompt rows, then prompt rows) as `GuidedDenoiser` builds it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from PIL import Image, ImageOps

from easel.pipelines.common import UNetFn
from easel.pipelines.conditioning import SIGMA_RTOL
from easel.pipelines.control_pre import canonical, preprocess
from easel.pipelines.control_unit import ControlUnit
from easel.pipelines import images
from easel.pipelines.images import resize_image
from easel.pipelines.plan import SamplingPlan
from easel.pipelines.refiner import SwitchDenoiser
from easel.pipelines.request import GenerationRequest
from easel.weights.controlnet_load import LoadedControlNet, load_controlnet

SOFT_DECAY = 0.825  # sd-webui-controlnet's (and the ControlNet paper's guess mode) per-block decay


@dataclasses.dataclass
class ActiveControl:
    """A unit of a request with its network loaded and its source images chosen."""

    unit: ControlUnit
    control: LoadedControlNet
    image: Image.Image  # the condition image before fitting (the unit's, else the request's init image)
    mask: Image.Image | None  # for the inpaint preprocessor
    # Inpainting "only masked": (the init image's size, its repaint mask) whose crop the hint follows
    masked_area: tuple[tuple[int, int], Image.Image] | None = None
    padding: int = 0  # inpaint_full_res_padding, with masked_area
    hints: dict = dataclasses.field(default_factory=dict)  # (width, height) -> (1, 3, H, W) hint

    @property
    def cond_only(self) -> bool:
        """Whether the residuals reach only the prompt half of the guidance batch."""
        return self.unit.control_mode == "control" or self.control.net.cfg.global_average_pooling

    def runs_at(self, fraction: float) -> bool:
        """Whether the unit acts at this fraction of the steps (A1111: start <= i / n <= end, weight > 0)."""
        u = self.unit
        return u.weight > 0 and u.guidance_start <= fraction <= u.guidance_end

    def scales(self, n: int, hires_pass: bool = False) -> list[float]:
        """The weight of each of the n residuals (input block 0 first, the middle block last). A canny unit in a
        hires fix's second pass always gets the decaying scales (sd-webui-controlnet: fewer artifacts)."""
        w = float(self.unit.weight)
        soft = self.unit.control_mode != "balanced" or (hires_pass and canonical(self.unit.preprocessor) == "canny")
        if not soft:
            return [w] * n
        return [w * SOFT_DECAY ** (n - 1 - k) for k in range(n)]

    def hint(self, width: int, height: int) -> torch.Tensor:
        """The hint (1, 3, height, width) float: the image fitted to the processing size, then preprocessed."""
        if (width, height) not in self.hints:
            u = self.unit
            fitted, mask = self.fitted(self.image.convert("RGB"), width, height), None
            if self.mask is not None:
                mask = self.fitted(self.mask.convert("L"), width, height)
            arr = preprocess(u.preprocessor, fitted, u.threshold_a, u.threshold_b, mask)  # (H, W, 3)
            self.hints[(width, height)] = torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()
        return self.hints[(width, height)]

    def fitted(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """An image at the processing size: fitted with the unit's resize mode, or, when inpainting only the masked
        area, brought to the init image's size and cropped to the same region as the init image (A1111's)."""
        if self.masked_area is None:
            return resize_image(image, width, height, self.unit.resize_mode)
        size, region_mask = self.masked_area
        if image.size != size:
            image = resize_image(image, *size, self.unit.resize_mode)
        region = images.expand_to_aspect(images.mask_crop_region(region_mask, self.padding), width, height, *size)
        return images.crop_for_region(image, region, width, height)


class ControlSet:
    """The ControlNets of one request: loaded (cached on the model), applied to each plan, recorded in params."""

    def __init__(self, controls: list[ActiveControl], first_pass_size: tuple[int, int] | None = None):
        self.controls = controls
        self.first_pass_size = first_pass_size  # (width, height) of a hires fix's first pass; None: no hires fix

    @staticmethod
    def for_request(loaded, req: GenerationRequest) -> "ControlSet":
        """Load the request's ControlNets for `loaded` (same dtype and device) and pick each unit's images."""
        model = loaded.model
        controls = []
        for i, unit in enumerate(req.controlnets):
            unit.check(i, bool(req.init_images))
            control = cached_controlnet(loaded, unit.model, req.dtype, model.device)
            if control.net.cfg.downsample != model.config.vae.downsample:
                raise ValueError(f"controlnets[{i}] ({control.name}) works on hints {control.net.cfg.downsample}x the "
                                 f"latent size but the model's VAE downsamples by {model.config.vae.downsample}: "
                                 "use a ControlNet made for this model")
            image = unit.image if unit.image is not None else req.init_images[0]
            active = ActiveControl(unit, control, image, _unit_mask(unit, req))
            if req.mode == "inpaint" and req.inpaint_full_res:
                active.masked_area, active.padding = _masked_area(req), req.inpaint_full_res_padding
            controls.append(active)
        size = model.config.default_size
        first = (req.width or size, req.height or size) if req.mode == "txt2img" and req.enable_hr else None
        return ControlSet(controls, first)

    def extend(self, plan: SamplingPlan, loaded) -> SamplingPlan:
        """The plan with its ControlNets applied (a plan that runs no step is returned as it is)."""
        if plan.steps < 1 or not self.controls:
            return plan
        f = loaded.model.config.vae.downsample
        h, w = plan.noise.shape[-2:]
        hints = [c.hint(w * f, h * f).to(plan.noise.device) for c in self.controls]
        tracker = StepTracker(plan.denoiser, plan.sigmas)
        hires = self.first_pass_size is not None and (w * f, h * f) != self.first_pass_size
        if not hook_unet(tracker.inner, lambda fn: ControlledUNet(fn, self.controls, hints, tracker, hires)):
            return plan  # only a refiner runs this plan: A1111 does not control the refiner either
        return dataclasses.replace(plan, denoiser=tracker)

    def params(self) -> dict:
        """What the images' parameters record: each unit (without images) and A1111's "ControlNet N" texts."""
        units = []
        for c in self.controls:
            d = c.unit.to_dict()
            d.pop("image"), d.pop("mask")
            units.append({**d, "preprocessor": canonical(c.unit.preprocessor), "model_name": c.control.name,
                          "model_hash": c.control.hash})
        text = {f"ControlNet {i}": c.unit.infotext(c.control.hash) for i, c in enumerate(self.controls)}
        return {"controlnet_units": units, "controlnet_infotext": text}


def _unit_mask(unit: ControlUnit, req: GenerationRequest) -> Image.Image | None:
    """The mask the inpaint preprocessor uses: the unit's own, else the request's (inverted as the request is)."""
    if unit.mask is not None:
        return unit.mask
    if req.mask is None:
        return None
    mask = req.mask.convert("L")
    return ImageOps.invert(mask) if req.inpainting_mask_invert else mask


def _masked_area(req: GenerationRequest) -> tuple[tuple[int, int], Image.Image]:
    """(init image size, the repaint mask as inpainting prepares it) of an "only masked" inpainting request."""
    size = req.init_images[0].size
    mask = req.mask if req.mask.size == size else resize_image(images.binary_mask(req.mask), *size)
    return size, images.prepare_mask(mask, blur=req.mask_blur, invert=req.inpainting_mask_invert)


def cached_controlnet(loaded, spec: str, dtype: str, device) -> LoadedControlNet:
    """A ControlNet for this model, loaded once and kept beside it (keyed by path, dtype and device)."""
    from easel.weights.controlnet_load import resolve_controlnet
    cache = loaded.__dict__.setdefault("controlnets", {})
    key = (str(resolve_controlnet(spec).resolve()), str(dtype), str(device))
    if key not in cache:
        cache[key] = load_controlnet(key[0], loaded.model.config, dtype, device)
    return cache[key]


class StepTracker:
    """Top of the denoiser stack: records which step (of the plan's sigmas) and batch size each call is for."""

    def __init__(self, inner: Callable, sigmas: torch.Tensor):
        self.inner = inner
        self.sigmas = torch.as_tensor(sigmas).detach().float().cpu()
        self.step, self.batch = 0, 0

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        # The step whose interval (sigmas[i+1], sigmas[i]] holds sigma: a 2nd-order sampler's extra call counts too.
        self.step = int((self.sigmas[1:-1] * (1 + SIGMA_RTOL) >= s).sum())
        self.batch = x.shape[0]
        return self.inner(x, sigma, **extra)


def hook_unet(denoiser, make: Callable[[UNetFn], Callable]) -> bool:
    """Replace the base model's network call (the UNetFn under the eps/v wrapper, below a 9-channel model's
    ConcatInpaint) in a freshly built denoiser stack by `make(unet_fn)`; False when the stack has no base model."""
    node = denoiser
    while node is not None:
        if isinstance(node, SwitchDenoiser):
            node = node.base
            continue
        if hasattr(node, "schedule") and hasattr(node, "model"):  # EpsDenoiser / VDenoiser
            parent = node
            while not isinstance(parent.model, UNetFn):
                parent = parent.model  # ConcatInpaint and similar keep the network they wrap as .model
            parent.model = make(parent.model)
            return True
        node = getattr(node, "inner", None)
    return False


class ControlledUNet:
    """The UNet call with the active ControlNets' residuals added (cldm's ControlledUnetModel, several nets)."""

    def __init__(self, fn: UNetFn, controls: list[ActiveControl], hints: list[torch.Tensor], tracker: StepTracker,
                 hires_pass: bool = False):
        self.fn, self.controls, self.hints, self.tracker = fn, controls, hints, tracker
        self.hires_pass = hires_pass

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        fraction = self.tracker.step / max(self.tracker.steps, 1)
        active = [(c, h) for c, h in zip(self.controls, self.hints) if c.runs_at(fraction)]
        if not active:
            return self.fn(x, t, **cond)
        total = None
        for control, hint in active:
            residuals = self.residuals(control, hint, x, t, cond)
            total = residuals if total is None else [a + r for a, r in zip(total, residuals)]
        fn = self.fn
        return fn.unet(x.to(fn.dtype), t, control=total, **cond).float()

    def residuals(self, control: ActiveControl, hint: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                  cond: dict) -> list[torch.Tensor]:
        """One ControlNet's scaled residuals for this call's batch (rows: negative prompt first, then prompts)."""
        net = control.control.net
        rows = x.shape[0]
        hint = hint.to(x.device, x.dtype)
        hint = hint.expand(rows, -1, -1, -1) if hint.shape[0] == 1 else hint.repeat(rows // hint.shape[0], 1, 1, 1)
        # A 9-channel inpainting UNet's input is latent + mask + masked image: the ControlNet takes the latent only.
        x_in = x[:, :net.cfg.unet.in_channels]
        out = net(x_in, hint, t, cond["context"], cond.get("y"))
        scales = control.scales(len(out), self.hires_pass)
        if control.cond_only and rows > self.tracker.batch:  # no negative half at CFG scale 1
            keep = torch.ones(rows, 1, 1, 1, device=x.device, dtype=out[0].dtype)
            keep[:self.tracker.batch] = 0
            return [r * s * keep for r, s in zip(out, scales)]
        return [r * s for r, s in zip(out, scales)]
