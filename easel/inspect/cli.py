"""`easel inspect ...`: pictures of how Stable Diffusion works, drawn from a real run of the loaded model.

Every sub-command takes the generation flags of `easel generate` and inspects ONE image: the first image
`easel generate` makes with the same flags and `-n 1`.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from easel.inspect.run import (captured_run, first_text, load_pipeline, one_image_request, save_result,
                               texts_by_weight)


def add_inspect_parsers(sub, cli) -> None:
    """Register `easel inspect attention|tokens|steps|noise|model|clip|report`. `cli` is the `easel.cli` module, which
    passes itself so that its flag tables and helpers (add_generation_flags, request_from_args, progress_bar) are
    reused without this module importing it back (an import cycle)."""
    HIRES_FLAGS, REFINER_FLAGS, add_generation_flags = cli.HIRES_FLAGS, cli.REFINER_FLAGS, cli.add_generation_flags
    p = sub.add_parser("inspect", help="see inside: tokens, denoising steps, per-token cross-attention, forward "
                       "diffusion, the architecture, CLIP space")
    isub = p.add_subparsers(dest="inspect_command", required=True)

    a = isub.add_parser("attention", help="per-token cross-attention heat maps over the image (DAAM)")
    a.add_argument("prompt", help="what to draw")
    add_generation_flags(a, HIRES_FLAGS, REFINER_FLAGS)
    a.add_argument("--self-query", metavar="X,Y", help="also draw where the image position X,Y (pixels of the output "
                   "image) looks through self-attention (self-attention.png)")
    add_animation_flag(a, "attention")
    a.set_defaults(func=cmd_attention, cli=cli, out="inspect-attention")

    t = isub.add_parser("tokens", help="the 77 token slots, BPE pieces, emphasis weights and text embeddings")
    t.add_argument("prompt", help="the prompt to tokenize")
    add_generation_flags(t)
    t.add_argument("--json", action="store_true", help="print the table as JSON")
    t.set_defaults(func=cmd_tokens, cli=cli, out="inspect-tokens")

    s = isub.add_parser("steps", help="the denoising film strip: latent, preview, x0, noise and sigma per step")
    s.add_argument("prompt", help="what to draw")
    add_generation_flags(s, HIRES_FLAGS, REFINER_FLAGS)
    s.add_argument("--frames", type=int, default=8, help="steps shown in the grid (default 8; the animation has all)")
    s.add_argument("--schedules", metavar="A,B,...", help="also plot these schedules' sigmas side by side "
                   "(e.g. karras,exponential,normal) for the same steps")
    s.add_argument("--cfg-scales", metavar="S1,S2,...", help="also generate at these guidance scales and show their "
                   "x0 predictions side by side (e.g. 1,4,8; one more generation per scale)")
    add_animation_flag(s, "steps")
    s.set_defaults(func=cmd_steps, cli=cli, out="inspect-steps")

    n = isub.add_parser("noise", help="forward diffusion: an image's latent noised at a row of timesteps, and the "
                        "model's noise schedule (betas, alphas_cumprod, SNR, sigmas)")
    n.add_argument("image", nargs="?", help="the image to noise (default: a ShapeWorld render)")
    add_generation_flags(n)
    n.add_argument("--count", type=int, default=6, help="timesteps in the row, 0 to the last (default 6)")
    n.set_defaults(func=cmd_noise, cli=cli, out="inspect-noise", prompt="")

    m = isub.add_parser("model", help="the architecture: UNet blocks, resolutions, channels, cross-attention, "
                        "parameters and FLOPs per block, tensor sizes from prompt to pixels")
    add_generation_flags(m)
    m.add_argument("--json", action="store_true", help="print the tables as JSON")
    m.set_defaults(func=cmd_model, cli=cli, prompt="", out="inspect-model")

    c = isub.add_parser("clip", help="CLIP space: the similarity matrix of ShapeWorld captions, their paraphrases "
                        "and hard negatives (colours/shapes swapped, relation flipped, count changed), top-1 retrieval")
    add_generation_flags(c)
    c.add_argument("--count", type=int, default=8, help="captions in the matrix (default 8)")
    c.add_argument("--image-tower", default=None, help="a CLIP image tower fitted to this model's text encoder "
                   "(python3 -m easel.training.clip_image_tower); the built-in model ships its own")
    c.add_argument("--text-only", action="store_true", help="the text-text matrix even where an image tower exists")
    c.set_defaults(func=cmd_clip, cli=cli, out="inspect-clip", prompt="")

    r = isub.add_parser("report", help="one offline HTML page (index.html in --out) telling the whole story of one "
                        "image: prompt, tokens, embeddings, steps, attention, VAE decode, forward diffusion, CLIP")
    r.add_argument("prompt", help="what to draw")
    add_generation_flags(r, HIRES_FLAGS, REFINER_FLAGS)
    r.add_argument("--lang", default="en", help="language of the captions: en or zh (default en)")
    r.set_defaults(func=cmd_report, cli=cli, out="inspect-report")


def add_animation_flag(parser: argparse.ArgumentParser, name: str) -> None:
    """--animation gif,webp,mp4: the formats of the step-by-step animation."""
    parser.add_argument("--animation", default="gif", metavar="FORMATS", help=f"formats of {name}.(gif|webp|mp4), "
                        "comma-separated (default gif; mp4 needs PyAV: pip install av)")


def animation_formats(text: str) -> list[str]:
    """The --animation formats, checked (an unknown one, or mp4 without PyAV, fails before the model loads)."""
    from easel.animation import check_format
    return list(dict.fromkeys(check_format(f.strip()) for f in text.split(",") if f.strip())) or ["gif"]


def cmd_attention(args: argparse.Namespace) -> int:
    """easel inspect attention PROMPT ..."""
    from easel.inspect.attention import capture_maps, write_animation, write_attention, write_levels
    from easel.inspect.tokens import prompt_slots
    from easel.pipelines.common import embedding_library
    point = parse_query(args.self_query) if args.self_query else None
    formats = animation_formats(args.animation)
    pipe, req, result, cap = captured_run(args, steps=False, cfg=False, self_point=point)
    texts = texts_by_weight(cap)
    if not texts:
        raise ValueError("no cross-attention was captured: this model's UNet has no cross-attention layers")
    out = Path(args.out)
    save_result(out, result)
    text = texts[0]
    if len(texts) > 1:
        print(f"the prompt changes during sampling; maps of the text used longest: {text!r}", file=sys.stderr)
    slots = prompt_slots(pipe.loaded, text, embedding_library(pipe.loaded))
    written = write_attention(out, result.image, capture_maps(cap, text)[0], slots)
    first = next(r for r in cap.runs if text in r.attention).attention[text]  # the first (base) pass
    paths = [out / "image.png", out / "attention.png", write_levels(out / "levels.png", result.image, first, slots),
             *(write_animation(out / f"attention.{f}", result.image, first, slots) for f in formats),
             out / "attention.npz"]
    if point is not None:
        from easel.inspect.attention import write_self_attention
        paths.append(write_self_attention(out / "self-attention.png", result.image, cap.runs[-1].self_attention))
    print("\n".join(str(p) for p in paths if p is not None))  # no animation when the prompt has no words
    print(f"{len(written['tokens'])} token maps in {out / 'tokens'}, {len(written['words'])} word maps in "
          f"{out / 'words'}")
    return 0


def parse_query(text: str) -> tuple[float, float]:
    """'X,Y' (pixels) -> (x, y); errors name the flag."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--self-query takes X,Y in pixels of the image, e.g. 20,40 (got {text!r})") from None
    return x, y


def cmd_tokens(args: argparse.Namespace) -> int:
    """easel inspect tokens PROMPT ..."""
    from easel.inspect.tokens import format_table, token_table, tokens_figure
    from easel.pipelines.common import embedding_library
    req = one_image_request(args)
    pipe = load_pipeline(args, req)
    library = embedding_library(pipe.loaded)
    text = first_text(req.prompt, req.steps)
    rows = token_table(pipe.loaded, text, req.clip_skip, library)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        per_chunk = min(e.max_position_embeddings for e in pipe.config.text_encoders)
        print(format_table(rows, per_chunk))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from easel.files import save_image
    path = save_image(tokens_figure(pipe.loaded, text, req.clip_skip, library), out / "tokens.png")
    print(path, file=sys.stderr)
    return 0


def cmd_steps(args: argparse.Namespace) -> int:
    """easel inspect steps PROMPT ..."""
    from easel.animation import save_animation
    from easel.files import save_image
    from easel.inspect import steps as st
    if args.frames < 2:
        raise ValueError(f"--frames must be at least 2 (got {args.frames})")
    if args.cfg_scales:
        parse_floats(args.cfg_scales, "--cfg-scales")  # a typo fails before the model loads
    formats = animation_formats(args.animation)
    pipe, req, result, cap = captured_run(args, attention=False)
    out = Path(args.out)
    save_result(out, result)
    pics = st.StepPictures(pipe.loaded)
    written = [out / "image.png"]
    for n, run in enumerate(r for r in cap.runs if r.steps):
        tag = "" if n == 0 else f"-pass{n + 1}"
        written.append(save_image(st.film_strip(pics, run, args.frames), out / f"steps{tag}.png"))
        cfg = st.cfg_strip(pics, run, args.frames)
        if cfg is not None:
            written.append(save_image(cfg, out / f"cfg{tag}.png"))
        frames = st.animation_frames(pics, run)
        written += [save_animation(frames, out / f"steps{tag}.{f}") for f in formats]
        label = f"{result.params.get('sampler')}, {result.params.get('scheduler')}"
        written.append(save_image(st.schedule_plot({label: [s.sigma for s in run.steps]},
                                                   f"sigma per step, log scale ({label})"), out / f"schedule{tag}.png"))
    if args.schedules:
        written.append(save_image(schedules_figure(pipe, req, args.schedules), out / "schedules.png"))
    if args.cfg_scales:
        written.append(save_image(cfg_scales(args, pipe, req, pics), out / "cfg-scales.png"))
    print("\n".join(str(p) for p in written))
    return 0


def parse_floats(text: str, flag: str) -> list[float]:
    """'1,4,8' -> [1.0, 4.0, 8.0]; errors name the flag."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes numbers separated by commas, e.g. 1,4,8 (got {text!r})") from None
    if not values:
        raise ValueError(f"{flag} needs at least one number (got {text!r})")
    return values


def schedules_figure(pipe, req, names: str):
    """The sigmas of several schedules for the request's steps on one plot."""
    from easel.inspect.steps import schedule_plot
    from easel.pipelines import common
    from easel.samplers import resolve_scheduler
    schedule = common.make_schedule(pipe.loaded.model)
    series = {}
    for name in (n.strip() for n in names.split(",") if n.strip()):
        key = resolve_scheduler(name, "--schedules")
        series[key] = [float(v) for v in common.sigmas_for(schedule, key, req.steps)]
    return schedule_plot(series, f"sigma per step, log scale: {len(series)} schedules, {req.steps} steps")


def cfg_scales(args, pipe, req, pics):
    """Generate the same image at each of --cfg-scales and draw their x0 predictions side by side."""
    import dataclasses
    from easel.inspect.capture import Capture
    from easel.inspect.steps import cfg_scales_figure
    runs = []
    for scale in parse_floats(args.cfg_scales, "--cfg-scales"):
        r = dataclasses.replace(req, cfg_scale=scale)
        with Capture(attention=False, cfg=False) as cap, args.cli.progress_bar(r) as cb:
            result = pipe.generate(r, callback=cb, extend_plan=cap)[0]
        runs.append((scale, cap.runs[0], result.image))
    return cfg_scales_figure(pics, runs)


def cmd_noise(args: argparse.Namespace) -> int:
    """easel inspect noise [IMAGE] ..."""
    from tqdm import tqdm
    from easel.files import save_image
    from easel.inspect import noise as nz
    from easel.inspect.steps import StepPictures
    from easel.pipelines import common
    from easel.pipelines.sizes import final_size
    req = one_image_request(args)
    nz.row_timesteps(1000, args.count)  # a bad --count fails before the model loads
    pipe = load_pipeline(args, req)
    schedule = common.make_schedule(pipe.loaded.model)
    timesteps = nz.row_timesteps(schedule.num_timesteps, args.count)
    seed = max(req.seed, 0)  # the same figure every time unless a seed is given
    size = final_size(req, pipe.config.default_size)
    image = nz.open_image(args.image, size) if args.image else nz.default_image(size, seed)
    latent = common.encode(pipe.loaded.model, [image])[0].cpu()
    row = nz.noise_row(latent, schedule, timesteps, seed=seed)
    pics = StepPictures(pipe.loaded)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(row), unit="timestep", file=sys.stderr, leave=False) as bar:  # VAE decodes: the slow part
        figure = nz.noise_figure(pics, latent, row, on_column=lambda: bar.update(1))
    cfg = pipe.loaded.model.config
    label = f"{cfg.beta_schedule}, betas {cfg.beta_start:g}..{cfg.beta_end:g}, {schedule.num_timesteps} timesteps"
    written = [save_image(image, out / "image.png"), save_image(figure, out / "noise.png"),
               save_image(nz.schedule_figure(nz.schedule_series(schedule), label), out / "schedule.png")]
    print("\n".join(str(p) for p in written))
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    """easel inspect model ..."""
    from tqdm import tqdm
    from easel.files import save_image
    from easel.inspect.model import describe, format_report
    from easel.inspect.model_figure import model_figure
    from easel.pipelines.sizes import final_size
    req = one_image_request(args)
    pipe = load_pipeline(args, req)
    with tqdm(total=1, unit="UNet call", file=sys.stderr, leave=False) as bar:  # counting FLOPs runs the UNet once
        info = describe(pipe.loaded.model, final_size(req, pipe.config.default_size))
        bar.update(1)
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    print(save_image(model_figure(info), Path(args.out) / "model.png"), file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_clip(args: argparse.Namespace) -> int:
    """easel inspect clip ..."""
    req = one_image_request(args)
    from easel.inspect import clip as cl
    cl.caption_batch(args.count, 0)  # a bad --count fails before the model loads
    pipe = load_pipeline(args, req)
    tower = None if args.text_only else cl.image_tower(args.image_tower, pipe.loaded)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write = cl.write_text_text if tower is None else partial(cl.write_image_text, tower=tower)
    paths, lines = write(pipe.loaded, args.count, max(req.seed, 0), out)
    print("\n".join(lines + [str(p) for p in paths]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """easel inspect report PROMPT ..."""
    from easel.inspect.report import captions, write_report
    captions(args.lang)  # a bad --lang fails before the model loads
    print(write_report(args))
    return 0
