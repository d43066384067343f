"""The sampling plan: the one thing between a request and a sampler.

A plan holds the sigmas (already sliced for img2img or a hires pass), the starting latent, the per-image
noise and its generators, the denoiser as a stack of wrappers (model -> CFG with prompt schedules ->
refiner switch -> inpaint blend, each a callable around the one below) and what each step reports. A mode
(txt2img, img2img, hires, inpaint, outpaint) is a short function that builds plans; `run(plan)` calls the
sampler. Progress totals (`count_steps`), ETAs, previews and the step observers all read the plan, so no
step is counted twice. This is k-diffusion's principle (modes are sigma slicing plus denoiser wrappers)
one level up.

    plan = build_plan(loaded, req, seeds, request_sigmas(loaded.model, req))
    plan = plan.wrap(lambda d: MyWrapper(d)).observe(lambda step: print(step["i"], step["sigma"]))
    latents = run(plan, callback)
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from easel.pipelines import accel, common, conditioning
from easel.pipelines.refiner import SwitchDenoiser, check_pair, switch_step
from easel.pipelines.request import GenerationRequest
from easel.pipelines.sizes import final_size  # noqa: F401  (part of the plan's interface: what a request produces)
from easel.samplers import SAMPLERS, CFGDenoiser, NoiseSource
from easel.weights.detect import is_refiner

StepCallback = common.StepCallback


@dataclass(frozen=True)
class SamplingPlan:
    """Everything one sampler run needs; `run(plan)` executes it."""

    sampler: str  # a SAMPLERS key
    sigmas: torch.Tensor  # (steps + 1,) descending, already sliced (img2img / hires run the tail of a schedule)
    noise: torch.Tensor  # (B, C, h, w) unit noise of the batch's seeds, on the model's device
    noise_source: NoiseSource  # continues the seeds' generators for ancestral / SDE samplers
    denoiser: Callable  # (x, sigma) -> x0: the wrapper stack
    latent: torch.Tensor | None = None  # (B, C, h, w) the image to noise and repaint (img2img); None: pure noise
    eta: float | None = None  # noise multiplier, for the samplers that take one
    tags: dict = field(default_factory=dict)  # added to every step's dict (batch, pass, ...)
    observers: tuple[Callable[[dict], None], ...] = ()  # see every step's dict before the callback

    @property
    def steps(self) -> int:
        """Sampler steps this plan runs (0 when img2img strength leaves nothing to denoise)."""
        return len(self.sigmas) - 1

    def wrap(self, make: Callable[[Callable], Callable]) -> "SamplingPlan":
        """A plan whose denoiser is `make(current denoiser)`: the way to add behaviour around every model call."""
        return dataclasses.replace(self, denoiser=make(self.denoiser))

    def observe(self, observer: Callable[[dict], None]) -> "SamplingPlan":
        """A plan that also calls `observer(step_dict)` at every step (previews, capture, logging)."""
        return dataclasses.replace(self, observers=(*self.observers, observer))

    def tagged(self, **tags) -> "SamplingPlan":
        """A plan whose step dicts also carry `tags`."""
        return dataclasses.replace(self, tags={**self.tags, **tags})

    def start(self) -> torch.Tensor:
        """x at sigmas[0]: pure noise scaled by sqrt(1 + s0^2) (the exact VP -> VE rescale, as diffusers and
        ComfyUI), or the latent plus noise * s0 (SDEdit, Meng et al. 2021)."""
        s0 = float(self.sigmas[0])
        if self.latent is None:
            return self.noise * math.sqrt(1 + s0 * s0)
        return self.latent + self.noise * s0


def run(plan: SamplingPlan, callback: StepCallback | None = None) -> torch.Tensor:
    """Run the plan's sampler; every step's dict ({i, x, sigma, sigma_next, denoised, steps, model?, tags})
    goes to the observers, then to `callback` (which may raise Interrupted / Skipped).

    Interrupted inside `run_batches` ends the run early with the last step's x0 prediction, so the batch still
    comes out as it stands (A1111's interrupt), and no later plan of the request samples."""
    interrupt = _INTERRUPT.get()
    if plan.steps < 1 or (interrupt is not None and interrupt.is_set()):  # strength 0, or after an interrupt
        return plan.latent.clone()
    sampler = SAMPLERS[plan.sampler]
    options = {"eta": plan.eta} if plan.eta is not None and _takes_eta(sampler) else {}
    last = {}
    report = _reporter(plan, callback, last)
    x = plan.start()
    try:
        return sampler(plan.denoiser, x, plan.sigmas.to(x.device), callback=report, noise=plan.noise_source,
                       **options)
    except common.Interrupted:
        if interrupt is None or "denoised" not in last:
            raise
        interrupt.set()
        return last["denoised"]


def _takes_eta(sampler: Callable) -> bool:
    """Whether a sampler has an `eta` option (A1111 clients send eta with every sampler; others ignore it)."""
    return "eta" in inspect.signature(sampler).parameters


def _reporter(plan: SamplingPlan, callback: StepCallback | None, last: dict) -> StepCallback:
    """The sampler's step callback: the plan's step count, tags and (across a refiner switch) which model ran;
    keeps the step's x0 prediction in `last` (what an interrupt returns)."""
    switch = _switch_of(plan.denoiser)

    def report(d: dict) -> None:
        last["denoised"] = d["denoised"]
        d = {**d, "steps": plan.steps, **plan.tags}
        if switch is not None:
            d["model"] = "base" if switch.uses_base(d["sigma"]) else "refiner"
        for observe in plan.observers:
            observe(d)
        if callback is not None:
            callback(d)
    return report


def _switch_of(denoiser) -> SwitchDenoiser | None:
    """The refiner switch in a denoiser stack (wrappers keep the one they wrap as `.inner`), if any."""
    while denoiser is not None:
        if isinstance(denoiser, SwitchDenoiser):
            return denoiser
        denoiser = getattr(denoiser, "inner", None)
    return None


# --- sigmas and steps --------------------------------------------------------------------------------------
def request_sigmas(model, req: GenerationRequest) -> torch.Tensor:
    """The request's whole schedule: `req.steps` steps of `req.scheduler` on the model's noise levels."""
    return common.sigmas_for(common.make_schedule(model), req.scheduler, req.steps)


def steps_to_run(steps: int, strength: float, run_steps: int | None = None) -> int:
    """Steps an img2img-style pass runs of a `steps` schedule: `run_steps`, else int(steps * strength) (as
    diffusers and A1111 count them), within [0, steps]."""
    n = int(steps * strength) if run_steps is None else run_steps
    return min(max(n, 0), steps)


def img2img_sigmas(sigmas: torch.Tensor, strength: float, run_steps: int | None = None) -> torch.Tensor:
    """The tail of a schedule that img2img runs, so that denoising starts from a partly noised image."""
    steps = len(sigmas) - 1
    return sigmas[steps - steps_to_run(steps, strength, run_steps):]


def hires_schedule_steps(req: GenerationRequest) -> int:
    """Length of the hires second pass's schedule. With hr_second_pass_steps = N, A1111 runs exactly N steps, taken
    from the end of an int(N / strength) schedule; with 0, it runs int(steps * strength) of a `steps` schedule."""
    if not req.hr_second_pass_steps or req.hr_denoising_strength == 0:
        return req.steps
    return int(req.hr_second_pass_steps / min(req.hr_denoising_strength, 0.999))


def hires_run_steps(req: GenerationRequest) -> int | None:
    """Steps the hires second pass runs when fixed by hr_second_pass_steps (None: int(steps * strength))."""
    if not req.hr_second_pass_steps or req.hr_denoising_strength == 0:
        return None  # strength 0 runs nothing
    return req.hr_second_pass_steps


def pass_steps(req: GenerationRequest) -> list[int]:
    """Sampler steps of each pass of one batch of a request (txt2img: [steps]; hires: [first, second];
    img2img, inpaint and outpaint: the tail that `denoising_strength` runs)."""
    if req.mode != "txt2img":
        return [steps_to_run(req.steps, req.denoising_strength)]
    if not req.enable_hr:
        return [req.steps]
    return [req.steps, steps_to_run(hires_schedule_steps(req), req.hr_denoising_strength, hires_run_steps(req))]


def count_steps(req: GenerationRequest) -> int:
    """Sampler steps a request runs in all: every pass of every batch (progress totals and ETAs use this); a
    request whose images draw their own wildcards runs one image at a time."""
    runs = (req.batch_size or 1) * req.n_iter if req.draws_per_image else req.n_iter
    return sum(pass_steps(req)) * runs


# --- noise -------------------------------------------------------------------------------------------------
def seed_noise(req: GenerationRequest, seeds: list[int], shape: tuple[int, ...],
               factor: int) -> tuple[torch.Tensor, NoiseSource]:
    """The seeds' unit noise (B, *shape), with A1111's variation seed and "resize seed from" when requested."""
    resize = (req.seed_resize_from_w, req.seed_resize_from_h)
    if req.subseed_strength <= 0 and not all(resize):
        return common.initial_noise(seeds, shape)
    from easel.pipelines.noise import variation_noise
    subseeds = [req.subseed + (s - req.seed) for s in seeds]  # variation seeds count up with the seeds (A1111)
    return variation_noise(seeds, shape, subseeds, req.subseed_strength, resize if all(resize) else None, factor)


# --- the denoiser stack -----------------------------------------------------------------------------------
def guided_denoiser(loaded, req: GenerationRequest, batch: int, sigmas: torch.Tensor, *,
                    wrap_unet: Callable | None = None, prompt_steps: int | None = None,
                    hires_steps: int | None = None):
    """Model -> CFG with A1111 prompt conditioning (weights, BREAK, long prompts, [a:b:when], AND, textual
    inversion by file name) for `loaded`, stepping over `sigmas`.

    `prompt_steps` (default `req.steps`) and `hires_steps` are the step counts that `[a:b:when]` refers to
    (A1111: the first pass's steps, and a hires pass's). An SDXL refiner's prompt gets
    `req.extra['aesthetic_score']` (6.0) and its negative prompt `req.extra['negative_aesthetic_score']` (2.5).
    `wrap_unet(unet_fn) -> unet_fn` changes the network call (a 9-channel inpainting model's extra channels).
    """
    model = loaded.model
    cond, uncond = conditioning.build_conditioning(
        loaded, req.prompt, req.negative_prompt, prompt_steps or req.steps, batch, req.width, req.height,
        req.clip_skip, common.embedding_library(loaded), hires_steps=hires_steps)
    if is_refiner(model.config):
        scores = (req.extra.get("aesthetic_score", conditioning.AESTHETIC_SCORE),
                  req.extra.get("negative_aesthetic_score", conditioning.NEGATIVE_AESTHETIC_SCORE))
        cond, uncond = (conditioning.rescored(pc, s, req.width, req.height) for pc, s in zip((cond, uncond), scores))
    denoiser = common.make_denoiser(model, common.make_schedule(model), _with_accel(req, wrap_unet))
    if req.cfg_cutoff != accel.CFG_CUTOFF_OFF:  # opt-in guidance truncation (issue 11); off: the exact class
        from easel.pipelines.accel.cfg_cutoff import CutoffGuidedDenoiser
        return CutoffGuidedDenoiser(denoiser, cond, uncond, req.cfg_scale, sigmas, req.cfg_cutoff)
    return conditioning.GuidedDenoiser(denoiser, cond, uncond, req.cfg_scale, sigmas)


def _with_accel(req: GenerationRequest, wrap_unet: Callable | None) -> Callable | None:
    """`wrap_unet` with the request's opt-in feature caching / token merging innermost, next to the UNet (so a
    9-channel model's extra channels are already there); unchanged when both are off."""
    fast = accel.unet_wrapper(req)
    if fast is None:
        return wrap_unet
    return fast if wrap_unet is None else (lambda fn: wrap_unet(fast(fn)))


def request_denoiser(loaded, req: GenerationRequest, batch: int, sigmas: torch.Tensor, refiner=None, **options):
    """The guided denoiser of one run; with a `refiner` (LoadedModel), a SwitchDenoiser over the base model's
    (above the switch sigma) and the refiner's (from there on), A1111's refiner switch. `options`: see
    `guided_denoiser` (`wrap_unet` applies to the base model only)."""
    if refiner is None:
        return guided_denoiser(loaded, req, batch, sigmas, **options)
    check_pair(loaded.model, refiner.model)
    k = switch_step(len(sigmas) - 1, req.refiner_switch_at)
    # Only the models that run encode their prompts (k = 0: refiner only; k = all steps: base only).
    base = guided_denoiser(loaded, req, batch, sigmas, **options) if k > 0 else None
    options.pop("wrap_unet", None)
    ref = guided_denoiser(refiner, req, batch, sigmas, **options) if k < len(sigmas) - 1 else None
    return SwitchDenoiser(base, ref, float(sigmas[k]), refiner.model.device)


def build_plan(loaded, req: GenerationRequest, seeds: list[int], sigmas: torch.Tensor,
               latent: torch.Tensor | None = None, *, refiner=None, **options) -> SamplingPlan:
    """The plan of one batch of a resolved request over `sigmas`: from the seeds' noise alone (txt2img) or from
    `latent` (1 or B, C, h, w) noised to sigmas[0] (img2img). `options`: see `guided_denoiser`."""
    model = loaded.model
    f = model.config.vae.downsample
    shape = tuple(latent.shape[1:]) if latent is not None else (model.config.vae.embed_dim, req.height // f,
                                                                 req.width // f)
    noise, source = seed_noise(req, seeds, shape, f)
    if latent is not None:
        latent = latent.float().to(model.device).expand(len(seeds), *shape)
    denoiser = request_denoiser(loaded, req, len(seeds), sigmas, refiner, **options) if len(sigmas) > 1 else None
    plan = SamplingPlan(req.sampler, sigmas, noise.to(model.device), source, denoiser, latent, req.eta)
    for extend in _EXTENSIONS.get():
        plan = extend(plan, loaded)
    return plan


# Functions (plan, loaded model) -> plan applied to every plan built inside `extending(...)`: how the see-inside
# capture (or a ControlNet) reaches the plans a mode builds without every mode passing it along.
_EXTENSIONS: contextvars.ContextVar[tuple] = contextvars.ContextVar("plan_extensions", default=())


@contextlib.contextmanager
def extending(*extensions: Callable[[SamplingPlan, object], SamplingPlan]):
    """Within the block, `build_plan` passes each plan it builds through `extensions` (e.g. to add an observer or
    wrap the denoiser) before returning it."""
    token = _EXTENSIONS.set((*_EXTENSIONS.get(), *extensions))
    try:
        yield
    finally:
        _EXTENSIONS.reset(token)


# --- batches --------------------------------------------------------------------------------------------------
def batch_seeds(req: GenerationRequest, it: int) -> list[int]:
    """Seeds of batch `it`: they count up from `req.seed` across batches (A1111)."""
    return [req.seed + it * req.batch_size + i for i in range(req.batch_size)]


def run_batches(req: GenerationRequest, make_batch: Callable[[int, list[int]], list],
                on_batch: Callable[[list], None] | None = None) -> list:
    """Call `make_batch(index, seeds)` for each of `req.n_iter` batches, handing each finished batch to
    `on_batch` (to save it at once). A step callback raising Skipped drops that batch; Interrupted stops
    sampling, and the batch comes out from its last x0 prediction, the last one (A1111); Interrupted from
    anywhere else (a cancel inside the VAE) returns what was finished before."""
    out = []
    interrupt = threading.Event()
    token = _INTERRUPT.set(interrupt)
    try:
        for it in range(req.n_iter):
            try:
                done = make_batch(it, batch_seeds(req, it))
            except common.Skipped:
                continue
            except common.Interrupted:
                break
            out.extend(done)
            if on_batch is not None:
                on_batch(done)
            if interrupt.is_set():
                break
    finally:
        _INTERRUPT.reset(token)
    return out


# Set by `run` when a step callback interrupted sampling inside `run_batches` (see there).
_INTERRUPT: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("interrupt", default=None)


# --- evaluation fast path -------------------------------------------------------------------------------------
@torch.no_grad()
def sample_plain_batch(loaded, prompts: list[str], sampler: str = "dpmpp_2m", scheduler: str = "karras",
                       steps: int = 20, cfg_scale: float = 5.0, seed: int = 1000) -> torch.Tensor:
    """Latents (B, C, h, w) of all prompts as one batch at the model's default size: plain text (no prompt syntax),
    CFG against the empty prompt, seed + i for image i. Far faster than one request per prompt (evaluations)."""
    model = loaded.model
    cond = common.encode_prompts(model, loaded.tokenizers, prompts)
    uncond = common.encode_prompts(model, loaded.tokenizers, [""] * len(prompts))
    schedule = common.make_schedule(model)
    denoiser = CFGDenoiser(common.make_denoiser(model, schedule), {"context": cond["context"]},
                           {"context": uncond["context"]}, cfg_scale)
    side = model.config.default_size // model.config.vae.downsample
    noise, source = common.initial_noise([seed + i for i in range(len(prompts))],
                                         (model.config.unet.in_channels, side, side))
    sigmas = common.sigmas_for(schedule, scheduler, steps)
    return run(SamplingPlan(sampler, sigmas, noise.to(model.device), source, denoiser))
