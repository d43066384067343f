"""Peak-memory estimate of a request, checked before it runs, so that no request can exhaust the machine.

The estimate counts what a run holds at its largest moment: the weights, plus the larger of the UNet's
activations (the CFG batch of 2 x batch_size, with efficient attention, at every pass's size) and the VAE's
decode or encode (tiled or not, as `AutoencoderKL` will choose for that size). It is an upper bound by design:
each layer's live tensors are counted as if none were freed early, times a safety margin for allocator slack.
It counts tensors, not time: the same request gives the same estimate on every machine.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

from easel.models import vae as vae_mod
from easel.models.configs import ModelConfig, UNetConfig
from easel.pipelines.request import GenerationRequest
from easel.pipelines.sizes import final_size

ITEMSIZE = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
# Multiplies the counted activations: covers allocator fragmentation and the temporaries of conv/GroupNorm
# kernels that the per-layer count leaves out (calibrated in bench/memory_cap.py; see tests/pipelines/test_memory.py).
SAFETY = 1.5
# Memory the runtime needs besides the model (Python, torch's libraries, the server): a floor, not a fit.
RUNTIME_BYTES = 512 << 20
# What one run adds whatever its size: kernel caches and scratch, and small blocks the allocator keeps after the
# UNet pass (measured: 60-150 MiB above the largest pass on small images, lost in the noise on large ones).
RUN_OVERHEAD_BYTES = 160 << 20
UNLIMITED = 1 << 60  # cgroup v2 "max" and v1's huge sentinel both mean "no limit"


class MemoryLimitError(ValueError):
    """A request whose estimated peak memory exceeds the limit (a 4xx for the HTTP API)."""


def estimate_peak_bytes(config: ModelConfig, req: GenerationRequest, refiner: ModelConfig | None = None) -> int:
    """Upper bound of the process memory a resolved request needs on this model (weights included; a refiner's
    too when its config is given)."""
    return sum(estimate_breakdown(config, req, refiner).values())


def estimate_breakdown(config: ModelConfig, req: GenerationRequest, refiner: ModelConfig | None = None
                       ) -> dict[str, int]:
    """{'runtime', 'weights', 'activations', 'images'} bytes: the parts `estimate_peak_bytes` adds up."""
    item = _itemsize(req.dtype)
    vae_item = _vae_itemsize(req.dtype)
    batch = req.batch_size or config.default_batch
    f, tiled = config.vae.downsample, req_tiled(req)
    work = pixels = 0
    for w, h in pass_sizes(req):
        lh, lw = max(1, h // f), max(1, w // f)
        unet = unet_elements(config.unet, 2 * batch, lh, lw) * item
        decode = vae_elements(config, batch, lh, lw, vae_item, encode=False, tiled=tiled) * vae_item
        encode = 0
        if req.init_images or (req.enable_hr and req.hr_upscaler == "lanczos"):
            encode = vae_elements(config, batch, lh, lw, vae_item, encode=True, tiled=tiled) * vae_item
        work = max(work, unet, decode, encode)
        pixels = max(pixels, batch * 3 * h * w * 4 * 3)  # fp32 pixels, their clamped copy and the init images
    models = [config] + ([refiner] if refiner is not None else [])
    w, h = pass_sizes(req)[-1]
    return {"runtime": RUNTIME_BYTES,
            "weights": sum(weight_bytes(c, item, vae_item) for c in models),
            # oneDNN reorders a conv's weights into its own layout while it runs: one largest tensor, twice
            "activations": int(work * SAFETY) + RUN_OVERHEAD_BYTES + 2 * max(largest_weight(c) for c in models) * item,
            "images": pixels + req.n_iter * batch * 3 * w * h}  # finished images wait until every batch is done


def check_fits(config: ModelConfig, req: GenerationRequest, limit_bytes: int,
               refiner: ModelConfig | None = None) -> None:
    """Raise MemoryLimitError (naming estimate, limit and the fix) when the request would not fit in `limit_bytes`."""
    need = estimate_peak_bytes(config, req, refiner)
    if need <= limit_bytes:
        return
    w, h = max(pass_sizes(req), key=lambda s: s[0] * s[1])
    batch = req.batch_size or config.default_batch
    tiled = "" if req_tiled(req) is not False else ", or allow tiled VAE decoding (tiled_vae: null or true)"
    raise MemoryLimitError(
        f"this request would need about {_gib(need)} of memory ({w}x{h} pixels, batch {batch}) but the limit is "
        f"{_gib(limit_bytes)}: ask for a smaller size or batch size{tiled}")


def available_memory_bytes() -> int:
    """Memory this process may hold in total: the cgroup (v2 or v1) limit if one is set, else MemAvailable plus
    what the process already holds (its resident set counts against neither)."""
    limit = _cgroup_limit()
    if limit is not None:
        return limit
    return _meminfo("MemAvailable") + _rss_bytes()


def pass_sizes(req: GenerationRequest) -> list[tuple[int, int]]:
    """(width, height) of every sampling pass: the base size, the hires size, or the outpainted canvas."""
    w, h = req.width, req.height
    if w is None or h is None:
        raise ValueError("estimate_peak_bytes needs a resolved request (width and height set): call resolved() first")
    final = final_size(req, w)  # the size arithmetic the modes use
    if req.mode == "outpaint":
        return [final]  # the canvas is all that samples
    return [(w, h), final] if req.enable_hr and req.mode == "txt2img" else [(w, h)]


def req_tiled(req: GenerationRequest) -> bool | None:
    """The request's tiled_vae choice (None = automatic)."""
    return req.tiled_vae


def vae_elements(config: ModelConfig, batch: int, h: int, w: int, itemsize: int, encode: bool,
                 tiled: bool | None) -> int:
    """Peak activation elements of a VAE pass over (batch, h, w) latents, tiled as AutoencoderKL will run it."""
    v = config.vae
    tile = vae_mod.auto_tile(v, batch, h, w, itemsize, encode) if tiled is None else (
        vae_mod.tile_size(v, itemsize, encode) if tiled else None)
    if tile is None:
        f = v.downsample
        return (vae_mod.encode_elements(v, batch, h * f, w * f) if encode else vae_mod.decode_elements(v, batch, h, w))
    return vae_mod.tiled_elements(v, batch, h, w, tile, encode)


def unet_elements(u: UNetConfig, batch: int, h: int, w: int) -> int:
    """Peak activation elements of one UNet call on (batch, C, h, w): every skip kept for the way up, plus the
    largest block's working set (ResBlock, or transformer with efficient attention: no (HW)^2 matrix)."""
    mc = u.model_channels
    skips, work = mc * h * w, 0
    ch, sizes = mc, []
    for level, mult in enumerate(u.channel_mult):
        sizes.append((h, w))
        for _ in range(u.num_res_blocks):
            work = max(work, _block(ch, mc * mult, u.transformer_depth[level], h * w))
            ch = mc * mult
            skips += ch * h * w
        if level != len(u.channel_mult) - 1:
            h, w = -(-h // 2), -(-w // 2)
            skips += ch * h * w
    work = max(work, _block(ch, ch, u.transformer_depth_middle, h * w))
    skip_chs = _skip_channels(u)
    for level, mult in reversed(list(enumerate(u.channel_mult))):
        lh, lw = sizes[level]
        for i in range(u.num_res_blocks + 1):
            c_in = ch + skip_chs.pop()
            ch = mc * mult
            work = max(work, _block(c_in, ch, u.transformer_depth[level], lh * lw) + c_in * lh * lw)
            if level and i == u.num_res_blocks:  # upsample to the next level: input, interpolated, conv output
                work = max(work, ch * lh * lw * 9)
    return batch * (skips + work + 2 * u.in_channels * sizes[0][0] * sizes[0][1])


def _skip_channels(u: UNetConfig) -> list[int]:
    """Channels of every skip tensor, in the order the input blocks push them."""
    mc = u.model_channels
    out, ch = [mc], mc
    for level, mult in enumerate(u.channel_mult):
        for _ in range(u.num_res_blocks):
            ch = mc * mult
            out.append(ch)
        if level != len(u.channel_mult) - 1:
            out.append(ch)
    return out


def _block(c_in: int, c_out: int, depth: int, positions: int) -> int:
    """Working set of a ResBlock (input, two norms, two convs, shortcut) or, if deeper, its transformer: input,
    norm, token copy, proj_in, attention (q, k, v, out, copies) and the GEGLU feed-forward (8C + 4C)."""
    res = 2 * c_in + 4 * c_out
    attn = 18 * c_out if depth else 0
    return positions * max(res, attn)


@functools.lru_cache(maxsize=16)
def parameter_counts(config: ModelConfig) -> tuple[int, int, int]:
    """(VAE parameters, all other parameters, elements of the largest weight), counted on a weightless (meta)
    build of the model."""
    from easel.models.sd import StableDiffusion
    model = StableDiffusion.empty(config)
    vae = sum(p.numel() for p in model.vae.parameters())
    total = sum(p.numel() for p in model.parameters())
    return vae, total - vae, max(p.numel() for p in model.parameters())


def largest_weight(config: ModelConfig) -> int:
    """Elements of the model's largest weight tensor."""
    return parameter_counts(config)[2]


def weight_bytes(config: ModelConfig, itemsize: int, vae_itemsize: int | None = None) -> int:
    """Bytes of the model's weights at the given element sizes."""
    vae, rest, _ = parameter_counts(config)
    return rest * itemsize + vae * (vae_itemsize or itemsize)


def _vae_itemsize(dtype: str) -> int:
    """Bytes per VAE element: an fp16 model keeps its VAE in fp32, so does `auto` on CPUs without AMX."""
    from easel.weights.model_io import vae_dtype_for
    _itemsize(dtype)  # the error for an unknown name
    return vae_dtype_for(dtype).itemsize


def _itemsize(dtype: str) -> int:
    if dtype == "auto":
        from easel.weights.model_io import auto_dtype
        dtype = auto_dtype()
    if dtype not in ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16, auto")
    return ITEMSIZE[dtype]


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{math.ceil(n / 2**20)} MiB"


def _cgroup_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max, else v1 memory.limit_in_bytes), None if unset."""
    for path in _cgroup_files(root):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if value < UNLIMITED else None
    return None


def _cgroup_files(root: Path) -> list[Path]:
    """Candidate limit files: this process's own cgroup (from /proc/self/cgroup) first, then the mount's root."""
    own = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if controllers == "":
                own.append(root / rel.lstrip("/") / "memory.max")
            elif "memory" in controllers.split(","):
                own.append(root / "memory" / rel.lstrip("/") / "memory.limit_in_bytes")
    except (OSError, ValueError):
        pass
    return own + [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]


def _meminfo(field: str, path: Path = Path("/proc/meminfo")) -> int:
    """A /proc/meminfo field in bytes (0 when unreadable, e.g. not Linux)."""
    try:
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == field:
                return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over fork and exec, so a child
    of a large process would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    """Resident set size of this process now (0 when unreadable)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
