"""What LoRA and textual-inversion training on a user's images share: the base model, cached latents, the text
encoders with gradients, the denoising loss of a batch, sample images.

The loss is the one every Stable Diffusion trainer uses (DDPM's: noise a latent at a uniformly drawn timestep and
predict the noise, or v for v-prediction models), written as `Denoiser.loss` so that the parameterisation and
min-SNR weighting (Hang et al. 2023) are the sampler's own. Noise offset (Guttenberg 2023) adds a per-channel
constant to the noise so that the model can learn overall brightness.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from easel.training.common import DistInfo, load_checkpoint, save_atomic, step_generator
from easel.training.dataset_folder import UserDataset, centre_crop, process_caption
from easel.training.settings import TrainingError
from easel.weights.model_io import LoadedModel


@dataclass(frozen=True)
class NoiseOptions:
    """How a batch is noised and weighted."""

    min_snr_gamma: float | None = None  # 5 is the paper's value; None: plain MSE
    noise_offset: float = 0.0  # 0.05-0.1 typical


def family_of(config) -> str:
    """'sd1' | 'sd2' | 'sdxl': the LoRA-file family of a model config (two text encoders: SDXL)."""
    if len(config.text_encoders) == 2:
        return "sdxl"
    return "sd2" if config.text_encoders[0].hidden_act == "gelu" else "sd1"


def kohya_base_version(config) -> str:
    """kohya's `ss_base_model_version` for a config."""
    return {"sdxl": "sdxl_base_v1-0", "sd2": "sd_v2"}.get(family_of(config), "sd_v1")


def load_base(spec: str | None, prediction: str | None = None) -> LoadedModel:
    """The model to train on: a path, a name from `easel models`, or the built-in model (None); frozen, eval."""
    from easel.weights.model_io import load_model
    from easel.weights.registry import resolve_model
    base = load_model(resolve_model(spec), prediction=prediction)
    base.model.eval().requires_grad_(False)
    return base


def run_dir(out: Path) -> Path:
    """The run folder of an output file: `my.safetensors` -> `my_run/` (checkpoint, log, loss curve, samples)."""
    return out.with_name(out.stem + "_run")


# --- latents ----------------------------------------------------------------------------------------------------

class Latents:
    """VAE latents of the dataset's items: encoded once and kept on disk when crops are fixed, else per step."""

    def __init__(self, base: LoadedModel, ds: UserDataset, cache: Path | None, progress: bool = True):
        self.base, self.ds = base, ds
        self.table: dict[tuple[int, bool], Tensor] = {}
        if not ds.opts.random_crop:
            self._load_or_encode(cache, progress)

    def _key(self) -> str:
        """What the cached latents depend on: the files (path, size, mtime), their buckets, the flip, the VAE."""
        vae = self.base.model.vae.state_dict()
        probe = [float(v.float().sum()) for k, v in sorted(vae.items())[:8]]
        files = [(str(it.path), it.path.stat().st_size, it.path.stat().st_mtime_ns, it.bucket) for it in self.ds.items]
        text = json.dumps([files, self.ds.opts.flip, probe, self.base.hash])
        return hashlib.sha256(text.encode()).hexdigest()

    def _load_or_encode(self, cache: Path | None, progress: bool) -> None:
        key = self._key()
        if cache is not None and cache.exists():
            data = load_checkpoint(cache)
            if data.get("key") == key:
                self.table = {(i, bool(f)): z for (i, f), z in zip(data["index"], data["latents"])}
                return
        flips = (False, True) if self.ds.opts.flip else (False,)
        todo = [(i, f) for i in range(len(self.ds.items)) for f in flips]
        if progress:
            print(f"encoding {len(todo)} training images with the VAE", file=sys.stderr)
        for i, f in todo:
            self.table[(i, f)] = self._encode(i, None, f)[0]
        if cache is not None:
            index = list(self.table)
            save_atomic({"key": key, "index": [list(k) for k in index], "latents": [self.table[k] for k in index]},
                        cache)

    @torch.no_grad()
    def _encode(self, index: int, gen: torch.Generator | None, flip: bool) -> tuple[Tensor, tuple]:
        x, size = self.ds.pixels(index, gen, flip)
        vae = self.base.model.vae
        z = vae.encode_latents(x[None].to(self.base.model.device, next(vae.parameters()).dtype))
        return z[0].float().cpu(), size

    def get(self, index: int, gen: torch.Generator, flip: bool) -> tuple[Tensor, tuple]:
        """(latent (C, h, w), SDXL's (orig h, w, crop top, left)) of item `index`."""
        if (index, flip) in self.table:
            it = self.ds.items[index]
            return self.table[(index, flip)], (it.size[1], it.size[0], *centre_crop(it.size, it.bucket))
        return self._encode(index, gen, flip)


@dataclass
class Batch:
    """One micro-batch: latents, processed captions and SDXL size conditioning; under torchrun this process's
    `rows` of a global batch of `total` items."""

    latents: Tensor  # (B, C, h, w)
    captions: list[str]
    sizes: list[tuple[int, int, int, int]]  # (orig h, w, crop top, left)
    rows: slice = field(default_factory=lambda: slice(None))
    total: int = 0

    def share(self, info: DistInfo) -> float:
        """The factor that turns this process's mean loss into its part of the global mean: after DDP averages
        over the processes, N processes train on exactly what one would (uneven splits included)."""
        return len(self.captions) * info.world / self.total if self.total else 1.0


def rank_rows(n: int, info: DistInfo) -> slice:
    """This process's rows of a batch of n items (as even as n allows)."""
    if n < info.world:
        raise TrainingError(f"a batch of {n} image(s) cannot be split over {info.world} processes: use a batch size "
                            f"of at least {info.world} and buckets holding as many images, or fewer processes")
    return slice(info.rank * n // info.world, (info.rank + 1) * n // info.world)


def make_batch(ds: UserDataset, latents: Latents, data_step: int, batch_size: int, seed: int,
               info: DistInfo | None = None) -> Batch:
    """This process's rows of the global batch of a data step: bucket batch, flips, crops and caption changes all
    seeded by (seed, step) and drawn for the whole batch, so that N processes see what one would."""
    gen = step_generator(seed, data_step, stream=1)
    zs, caps, sizes = [], [], []
    for i in ds.batch_indices(data_step, batch_size, seed):
        flip = ds.opts.flip and bool(torch.rand((), generator=gen) < 0.5)
        z, size = latents.get(i, gen, flip)
        zs.append(z)
        sizes.append(size)
        caps.append(process_caption(ds.items[i].caption, gen, ds.opts))
    rows = rank_rows(len(zs), info or DistInfo())
    return Batch(torch.stack(zs[rows]), caps[rows], sizes[rows], rows, len(zs))


# --- text and loss ----------------------------------------------------------------------------------------------

def token_ids(base: LoadedModel, captions: list[str]) -> list[Tensor]:
    """(B, 77) ids per text encoder (truncated at 75 tokens, as inference truncates a single chunk)."""
    encs = base.model.config.text_encoders
    return [tok(captions, max_length=enc.max_position_embeddings, pad_id=enc.pad_token_id)
            for tok, enc in zip(base.tokenizers, encs)]


def encode_text(base: LoadedModel, ids: list[Tensor], embeds: list[Tensor | None] | None = None
                ) -> tuple[Tensor, Tensor | None]:
    """`StableDiffusion.encode_text` (clip skip 1) without its no_grad: gradients reach the LoRA or the vectors."""
    model = base.model
    cfg = model.config
    embeds = embeds or [None] * len(ids)
    hidden, pooled = [], None
    for i, (enc, x, emb) in enumerate(zip(model.text_encoders, ids, embeds)):
        last = i == len(model.text_encoders) - 1
        h, p = enc(x.to(model.device), clip_skip=cfg.clip_skip, final_norm=cfg.text_final_norm,
                   need_pooled=cfg.pooled_text and last, inputs_embeds=emb)
        hidden.append(h)
        pooled = p if p is not None else pooled
    return torch.cat(hidden, dim=-1), pooled


class TextCache:
    """Text-encoder outputs per caption, for runs whose encoders stay frozen: each distinct caption (after tag
    shuffling and dropout) is encoded once, and the table is kept in the run folder for the next run on the same
    model (keyed by its hash), as `Latents` keeps the VAE's work."""

    def __init__(self, base: LoadedModel, path: Path | None = None):
        self.base, self.path = base, path
        self.rows: dict[str, tuple[Tensor, Tensor | None]] = {}
        if path is not None and path.exists():
            data = load_checkpoint(path)
            if data.get("model") == base.hash:
                self.rows = data["rows"]
        self.added = 0

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor | None]:
        """(context (B, 77, D), pooled (B, P) or None) of the captions, encoding only those not seen before."""
        for c in dict.fromkeys(c for c in captions if c not in self.rows):
            # One caption at a time: its row never depends on which captions it was first seen with, so a resumed
            # run gets bit-identical text conditioning.
            context, pooled = encode_text(self.base, token_ids(self.base, [c]))
            self.rows[c] = (context[0].cpu(), None if pooled is None else pooled[0].cpu())
            self.added += 1
        dev = self.base.model.device
        context = torch.stack([self.rows[c][0] for c in captions]).to(dev)
        pooled = [self.rows[c][1] for c in captions]
        return context, None if pooled[0] is None else torch.stack(pooled).to(dev)

    def save(self) -> None:
        """Write the table if it grew (atomically; rank 0's call)."""
        if self.path is not None and self.added:
            save_atomic({"model": self.base.hash, "rows": self.rows}, self.path)
            self.added = 0


def unet_cond(base: LoadedModel, context: Tensor, pooled: Tensor | None, batch: Batch) -> dict:
    """{'context', 'y' for SDXL}: SDXL's vector from each image's original size, crop and bucket (as SGM trains)."""
    cond = {"context": context.to(base.model.dtype)}
    if base.model.config.unet.adm_in_channels:
        from easel.models.unet import sdxl_vector
        h, w = batch.latents.shape[-2:]
        down = base.model.config.vae.downsample
        cond["y"] = torch.cat([sdxl_vector(pooled[k:k + 1], s[:2], s[2:], (h * down, w * down))
                               for k, s in enumerate(batch.sizes)]).to(base.model.dtype)
    return cond


def denoising_loss(base: LoadedModel, denoiser, x0: Tensor, cond: dict, gen: torch.Generator,
                   opts: NoiseOptions, rows: slice = slice(None), total: int = 0) -> Tensor:
    """Eps/v MSE at uniformly drawn timesteps, with noise offset and min-SNR weighting. `x0` may be `rows` of a
    global batch of `total`: timesteps and noise are drawn for all of it and sliced alike."""
    schedule = denoiser.schedule
    B = total or x0.shape[0]
    shape = (B, *x0.shape[1:])
    t = torch.randint(0, schedule.num_timesteps, (B,), generator=gen)[rows]
    noise = torch.randn(shape, generator=gen)
    if opts.noise_offset:
        noise = noise + opts.noise_offset * torch.randn(B, x0.shape[1], 1, 1, generator=gen)
    noise = noise[rows]
    dev = base.model.device
    return denoiser.loss(x0.to(dev), noise.to(dev), schedule.sigmas[t].to(dev), min_snr_gamma=opts.min_snr_gamma,
                         **cond)


@contextlib.contextmanager
def gradient_checkpointing(unet: nn.Module):
    """Recompute each UNet block's activations in the backward pass instead of keeping them (less memory, ~1/3 more
    compute): every input, middle and output block's forward runs under `torch.utils.checkpoint` while training."""
    from torch.utils.checkpoint import checkpoint
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for block in blocks:
        plain = block.forward
        block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False)
                         if torch.is_grad_enabled() else f(*a))(plain)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the class's forward again


def make_denoiser(base: LoadedModel):
    """The eps or v wrapper of the base model (the same one sampling uses)."""
    from easel.pipelines.common import make_denoiser as make, make_schedule
    return make(base.model, make_schedule(base.model))


# --- samples ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def save_samples(base: LoadedModel, prompts: list[str], path: Path, seed: int = 1, steps: int = 20,
                 library=None) -> Path:
    """One image per prompt (fixed seeds) side by side in a PNG: how the training is going."""
    from PIL import Image

    from easel.files import save_image
    from easel.pipelines.pipeline import Pipeline
    from easel.pipelines.request import GenerationRequest
    if library is not None:
        base.embeddings = library
    pipe = Pipeline(base)
    images = [pipe.generate(GenerationRequest(prompt=p, seed=seed + k, steps=steps, cfg_scale=5.0))[0].image
              for k, p in enumerate(prompts)]
    sheet = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
    x = 0
    for im in images:
        sheet.paste(im, (x, 0))
        x += im.width
    return save_image(sheet, path)


def check_prompts(prompts: list[str]) -> list[str]:
    """Sample prompts from --sample-prompt flags or a file (one per line)."""
    out = []
    for p in prompts or []:
        path = Path(p)
        if path.suffix == ".txt" and path.is_file():
            out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            out.append(p)
    if any(not p for p in out):
        raise TrainingError("--sample-prompt must not be empty")
    return out
