"""Compare easel's captured cross-attention with DAAM's heat maps on the same random weights.

    python3 scripts/daam_parity.py [--steps 5] [--size 256] [--prompt "a red cat and a blue dog"]

Needs daam, which is not one of easel's dependencies: pip install matplotlib spacy && pip install --no-deps
daam==0.2.0 (its requirements pin diffusers 0.21.2 and transformers 4.30.2; its code runs unchanged on the
diffusers and transformers easel pins).

DAAM (daam 0.2.0, Tang et al. 2022) hooks a diffusers StableDiffusionPipeline; easel's Capture hooks easel's own
pipeline. Both run a tiny SD1-layout model with the same random weights (easel's weights written as a diffusers
folder), the same prompt, negative prompt, CFG scale, initial noise and sampler (easel `euler` + `ddim_uniform` =
diffusers' EulerDiscreteScheduler with 'leading' timesteps when the step count divides 1000). DAAM's
aggregation, read from its trace.py and heatmap.py, is not easel's, and the script reproduces it from easel's
capture:

- DAAM hooks the cross-attention of the CrossAttn down and up blocks, not the middle block; it keeps the last
  half of the rows of `attention_probs` (the cond half under CFG), each head apart, summed over every UNet
  call, per (layer, head);
- it skips layers whose `factor` = int(sqrt(latent_hw / queries)) is 8 (the 8x8 maps of a 512 px run), and its
  default global map uses only factors 1, 2, 4, 8, 16, 32, 64; latent_hw is 64*64 when the model's default
  size (unet sample_size x VAE factor) is 512 or 1024 px, else 96*96 (so a model of another default size
  records factors such as 3 and 6, and compute_global_heat_map() then finds no map unless given `factors`);
- the global map of a token is the mean over (layer, head) of each map upsampled bicubically to that square
  grid and clamped at 0; the rows kept are <start>, the prompt's pieces and the first <end>; a word's map is
  the mean of the rows of every occurrence of its pieces in the prompt (also inside other words).

easel keeps per query resolution the head average summed over layers and calls (`AttentionSum.sums`). With the
same number of heads in every layer (SD1), mean_{l,h} bicubic(A_lh) = (1/L) sum_res bicubic(sums[res]) over
DAAM's levels, L its layer count; DAAM's clamp adds mean_{l,h} relu(-bicubic(A_lh)), taken from DAAM's own
per-head maps. The levels DAAM keeps and their layer counts are read from DAAM's records and checked against
easel's. Prints: the latents' gap, per level the raw sums' gap, the reconstruction's gap to DAAM's global map,
word maps, and how close easel's own maps (capture_maps: every layer incl. the middle block, bilinear to the
latent, averaged over calls) are to DAAM's (per-token Pearson r and max |diff| after min-max scaling).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's tests.conftest

from tests.conftest import random_model, tiny_config, tiny_vocab_size, write_tiny_vocab  # noqa: E402

PROMPT, NEGATIVE = "a red cat and a blue dog", "green"


def tiny_sd1(folder: Path, seed: int = 0):
    """A random-weight LoadedModel in SD1's layout: attention at every level but the lowest, where only the
    middle block has it (SD1.5: (1, 1, 1, 0)), so DAAM's skipped middle block sits at a resolution of its own.
    Its VAE downsamples by 8 as SD's (small and narrow), so that the diffusers folder's default size is 512 px
    (unet sample_size 64 x 8) and DAAM takes its SD1.5 path (a 64x64 grid)."""
    from easel.text.tokenizer import CLIPTokenizer
    from easel.weights.model_io import LoadedModel
    vocab, merges = write_tiny_vocab(folder / "tok")
    cfg = tiny_config("sd1", tiny_vocab_size(folder / "tok"))
    unet = dataclasses.replace(cfg.unet, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0))
    vae = dataclasses.replace(cfg.vae, ch=16, ch_mult=(1, 1, 1, 1), norm_groups=8)
    cfg = dataclasses.replace(cfg, name="tiny-sd1-daam", unet=unet, vae=vae, default_size=512)
    return LoadedModel(random_model(cfg, seed), [CLIPTokenizer.from_files(vocab, merges)], "", "")


def diffusers_pipe(loaded, folder: Path):
    """The same weights as a diffusers StableDiffusionPipeline with Euler ('leading' = easel's ddim_uniform)."""
    import diffusers
    from easel.weights.model_io import save_model
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(save_model(loaded, folder, to="diffusers"),
                                                             safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_daam(pipe, noise: torch.Tensor, prompt: str, negative: str, steps: int, cfg_scale: float):
    """One DAAM-traced diffusers run: (final latents, {(factor, layer, head): (77, h, w)}, global (T, g, g)).

    The global map comes from DAAM's default `compute_global_heat_map()`."""
    from daam import trace
    size = noise.shape[-1] * pipe.vae_scale_factor
    with torch.no_grad(), trace(pipe) as tc:
        latents = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg_scale,
                       height=size, width=size, latents=noise.clone(), output_type="latent").images
        raw = {key: m.detach().float().clone() for key, m in tc.all_heat_maps}
        glob = tc.compute_global_heat_map()
    return latents, raw, glob


def run_easel(loaded, seed: int, prompt: str, negative: str, steps: int, cfg_scale: float, size: int):
    """One captured easel run: (final latents (1, 4, h, w), Capture)."""
    from easel.inspect.capture import Capture
    from easel.pipelines.pipeline import Pipeline
    from easel.pipelines.request import GenerationRequest
    req = GenerationRequest(prompt, negative, width=size, height=size, steps=steps, cfg_scale=cfg_scale,
                            sampler="euler", scheduler="ddim_uniform", seed=seed, batch_size=1)
    with Capture() as cap:
        Pipeline(loaded).generate(req, extend_plan=cap)
    return cap.runs[0].steps[-1].x0, cap  # Euler's last step lands on its x0 (sigma_next = 0)


def daam_grid(pipe) -> int:
    """The side of DAAM's square output grid (its `latent_hw` rule in trace.py)."""
    h = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return 64 if h in (512, 1024) else 96


def daam_levels(raw: dict) -> dict[tuple[int, int], dict]:
    """Per map size (h, w) of DAAM's records: {'layers': set, 'heads': set, 'sum': (77, h, w) over layers, heads}."""
    out: dict = {}
    for (_, layer, head), m in raw.items():
        lv = out.setdefault(tuple(m.shape[-2:]), {"layers": set(), "heads": set(), "sum": 0})
        lv["layers"].add(layer)
        lv["heads"].add(head)
        lv["sum"] = lv["sum"] + m
    return out


def bicubic(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """(T, h, w) -> (T, grid, grid) as DAAM upsamples (bicubic, align_corners=False), unclamped."""
    return F.interpolate(maps[:, None].float(), size=(grid, grid), mode="bicubic")[:, 0]


def clamp_correction(raw: dict, grid: int, tokens: int) -> torch.Tensor:
    """mean_{l,h} relu(-bicubic(A_lh)): what DAAM's clamp of each upsampled per-head map adds to the mean."""
    return torch.stack([bicubic(m[:tokens], grid).neg().clamp(min=0) for m in raw.values()]).mean(0)


def daam_from_capture(attn, sizes, layers: int, grid: int, tokens: int) -> torch.Tensor:
    """DAAM's global map without its clamp, from easel's per-resolution sums: (1/L) sum_res bicubic(sums[res])."""
    total = 0
    for size in sizes:
        m = attn.sums[size][0].float().cpu()  # (h*w, S), image 0's cond rows
        total = total + bicubic(m.T.reshape(-1, *size)[:tokens], grid)
    return total / layers


def minmax(m: torch.Tensor) -> torch.Tensor:
    """Each (h, w) map scaled to [0, 1] (DAAM's expand_as normalisation)."""
    flat = m.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo + 1e-12)).view_as(m)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-map Pearson correlation of two (T, h, w) stacks."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-30)


@dataclass
class Parity:
    """Both runs' results, side by side (maps on the CPU, float32)."""

    prompt: str
    latents: tuple[Tensor, Tensor]  # final latents: diffusers + DAAM, easel
    pieces: list[str]  # the rows DAAM keeps: <start>, the prompt's BPE pieces, <end>
    grid: int  # DAAM's output grid side
    easel_layers: dict  # (h, w) -> cross-attention layers per model call, as easel counted them
    levels: dict  # (h, w) -> {'layers', 'heads', 'daam': DAAM's sum over layers and heads / heads, 'easel': sums}
    daam: Tensor  # DAAM's global map (T, grid, grid), compute_global_heat_map()
    recon: Tensor  # the same from easel's sums, before DAAM's clamp
    clamp: Tensor  # what DAAM's per-head clamp adds
    own: Tensor  # easel's capture_maps (T, h, w): every layer, bilinear to the latent, mean over layer calls
    own_levels: Tensor  # the same over DAAM's levels only (no middle block, no factor-8 level)
    words: dict = field(default_factory=dict)  # word -> (easel's word merge of recon + clamp, DAAM's word map)


def compare(folder: Path, prompt: str = PROMPT, negative: str = NEGATIVE, steps: int = 5, cfg_scale: float = 7.0,
            size: int = 256, seed: int = 3) -> Parity:
    """Run both on the same weights, prompt, noise and schedule; collect what each aggregated."""
    from easel.inspect.attention import capture_maps
    from easel.pipelines.common import initial_noise
    loaded = tiny_sd1(folder)
    pipe = diffusers_pipe(loaded, folder / "diffusers")
    scale = pipe.vae_scale_factor
    noise, _ = initial_noise([seed], (4, size // scale, size // scale))
    theirs, raw, glob = run_daam(pipe, noise, prompt, negative, steps, cfg_scale)
    ours, cap = run_easel(loaded, seed, prompt, negative, steps, cfg_scale, size)
    run = cap.runs[0]
    attn, calls = run.attention[prompt], len(run.steps)  # Euler: one model call per step
    tokens, grid = glob.heat_maps.shape[0], daam_grid(pipe)
    levels = {}
    for s, lv in daam_levels(raw).items():
        levels[s] = {"layers": len(lv["layers"]), "heads": len(lv["heads"]), "daam": lv["sum"] / len(lv["heads"]),
                     "easel": _level(attn, s)}
    layers = sum(lv["layers"] for lv in levels.values())
    daam = glob.heat_maps.float()
    res = Parity(prompt, (theirs, ours), ["<start>"] + [t.replace("</w>", "") for t in pipe.tokenizer.tokenize(prompt)]
                 + ["<end>"], grid, {s: attn.count[s] // calls for s in attn.count}, levels, daam,
                 daam_from_capture(attn, list(levels), layers, grid, tokens), clamp_correction(raw, grid, tokens),
                 capture_maps(cap, prompt)[0, :tokens], _bilinear_mean(attn, list(levels), run.latent_size)[:tokens])
    res.words = _words(loaded, glob, res.recon + res.clamp)
    return res


def _level(attn, size: tuple[int, int]) -> Tensor:
    """easel's sum at one query resolution as (S, h, w) maps of image 0: head mean summed over layers and calls."""
    return attn.sums[size][0].float().cpu().T.reshape(-1, *size)


def _bilinear_mean(attn, sizes, latent: tuple[int, int]) -> Tensor:
    """easel's aggregation (bilinear to the latent, mean over layer calls) over the given levels only."""
    total = sum(F.interpolate(_level(attn, s)[None], size=latent, mode="bilinear", align_corners=False)[0]
                for s in sizes)
    return total / sum(attn.count[s] for s in sizes)


def _words(loaded, glob, maps: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """word -> (easel's word merge (attention.word_maps over its own slots) of `maps`, DAAM's word map)."""
    from easel.inspect.attention import word_maps
    from easel.inspect.tokens import prompt_slots
    out = {}
    for word, m, _ in word_maps(maps.numpy(), prompt_slots(loaded, glob.prompt)):
        out.setdefault(word, (torch.from_numpy(m), glob.compute_word_heat_map(word).heatmap.float()))
    return out


def report(res: Parity) -> str:
    """The comparison as text."""
    gap = lambda a, b: float((a - b).abs().max())  # noqa: E731
    lines = [f"final latents, diffusers+DAAM vs easel: max |diff| {gap(*res.latents):.2e}",
             f"easel's cross-attention layers per model call, by query size: {res.easel_layers}",
             f"DAAM's grid {res.grid}x{res.grid}; rows kept {len(res.pieces)}: {' '.join(res.pieces)}"]
    for s, lv in sorted(res.levels.items(), key=lambda kv: -kv[0][0]):
        lines.append(f"level {s[0]}x{s[1]}: DAAM {lv['layers']} layers x {lv['heads']} heads; their sum / heads vs "
                     f"easel's sum: max |diff| {gap(lv['daam'], lv['easel']):.2e} (values up to "
                     f"{float(lv['easel'].max()):.3f})")
    lines.append(f"DAAM's global map (values up to {float(res.daam.max()):.3f}) vs easel's sums aggregated DAAM's way: "
                 f"max |diff| {gap(res.recon + res.clamp, res.daam):.2e} with DAAM's clamp term "
                 f"(up to {float(res.clamp.max()):.2e}), {gap(res.recon, res.daam):.2e} without")
    lines.append("per word, DAAM's compute_word_heat_map vs easel's word merge of the above: max |diff| "
                 + ", ".join(f"{w} {gap(*pair):.1e}" for w, pair in res.words.items()))
    own = F.interpolate(res.daam[:, None], size=res.own.shape[-2:], mode="area")[:, 0]
    lines.append("easel's own maps (capture_maps) vs DAAM's global map area-averaged to the latent, per row: "
                 "Pearson r, max |diff| after min-max scaling; r over DAAM's levels only (e.g. no middle block)")
    spread = (minmax(res.own) - minmax(own)).flatten(1).abs().max(1).values
    for t, a, b, c in zip(res.pieces, pearson(res.own, own), spread, pearson(res.own_levels, own)):
        lines.append(f"  {t:>8}  r {a:.4f}   max |diff| {b:.3f}   r over DAAM's levels only {c:.4f}")
    return "\n".join(lines)


def main() -> int:
    """Run the comparison and print it."""
    import tempfile
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default=PROMPT, help="words of the tiny vocabulary (a red blue green cat dog ...)")
    p.add_argument("--negative", default=NEGATIVE)
    p.add_argument("--steps", type=int, default=5, help="a divisor of 1000 (ddim_uniform = diffusers' 'leading')")
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale (> 1: DAAM assumes an uncond half)")
    p.add_argument("--size", type=int, default=256, help="image side in px (a multiple of 64; latent = size / 8)")
    p.add_argument("--seed", type=int, default=3)
    a = p.parse_args()
    try:
        import daam  # noqa: F401
    except ImportError as e:
        print(f"daam cannot be imported ({e}); install: pip install matplotlib spacy && "
              "pip install --no-deps daam==0.2.0", file=sys.stderr)
        return 2
    if a.size <= 0 or a.size % 8:
        p.error(f"--size must be a positive multiple of 8 (the VAE's factor), got {a.size}")
    if a.steps <= 0 or 1000 % a.steps:
        p.error("--steps must divide 1000: only then is easel's ddim_uniform schedule diffusers' 'leading' one")
    if a.cfg <= 1:
        p.error("--cfg must be above 1: DAAM takes the last half of the attention rows as the cond half")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(report(compare(Path(tmp), a.prompt, a.negative, a.steps, a.cfg, a.size, a.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
