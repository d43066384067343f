"""`easel ...` command line: generate, info, models, convert (more sub-commands register themselves here)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from PIL import Image

from easel.files import KNOWN_ERRORS, error_line
from easel.pipelines.request import GenerationRequest

# Request field -> (flags, help). The request schema drives the flags; defaults come from the schema.
# REQUEST_FLAGS go on every generating command; the other tables on the commands that use them.
REQUEST_FLAGS = {
    "negative_prompt": (("--negative-prompt", "--neg"), "what the image should not show"),
    "batch_size": (("-n", "--batch-size"), "images per batch (default: the model's default)"),
    "n_iter": (("--n-iter", "--batch-count"), "number of batches"),
    "steps": (("--steps",), "sampling steps"),
    "cfg_scale": (("--cfg-scale", "--cfg"), "classifier-free guidance scale"),
    "sampler": (("--sampler",), "sampler: easel name, A1111 label ('DPM++ 2M Karras') or ComfyUI name; see "
                                "`easel samplers`"),
    "scheduler": (("--scheduler",), "sigma schedule: easel name, A1111 label ('Karras') or ComfyUI name (default: the "
                                    "one a sampler label names, else karras; a label naming another is an error)"),
    "seed": (("--seed",), "seed of the first image (-1: random); later images count up"),
    "width": (("--width", "-W"), "width in pixels, multiple of 8 (default: the model's size; edits: the image's)"),
    "height": (("--height", "-H"), "height in pixels, multiple of 8 (default: the model's size; edits: the image's)"),
    "clip_skip": (("--clip-skip",), "use an earlier CLIP layer (A1111's clip skip)"),
    "eta": (("--eta",), "noise multiplier of ancestral/SDE samplers (default: the sampler's own)"),
    "subseed": (("--subseed",), "variation seed (-1: random), mixed in by --subseed-strength"),
    "subseed_strength": (("--subseed-strength",), "how much of the variation seed's noise to mix in, 0..1"),
    "preview_every": (("--preview-every",), "a live preview every N steps (0: none)"),
    "preview_mode": (("--preview-mode",), "previews by the fast latent->RGB map or a full VAE decode: approx|full"),
    # opt-in lossy accelerations (README "Lossy accelerations"); the defaults are the exact path
    "deepcache": (("--deepcache",), "feature caching (DeepCache): the full UNet every N-th call, its deep features "
                                    "reused in between; 1 is off, try 3"),
    "cfg_cutoff": (("--cfg-cutoff",), "guidance truncation: steps after this fraction run the prompt's pass only; "
                                      "1 is off, try 0.6"),
    "tome": (("--tome",), "token merging (ToMe): fraction of the highest-resolution self-attention tokens merged, "
                          "0..1 (0 is off, try 0.5)"),
}
HIRES_FLAGS = {
    "enable_hr": (("--hires",), "hires fix: generate at the base size, upscale, repaint with img2img"),
    "hr_scale": (("--hr-scale",), "hires upscale factor"),
    "hr_resize_x": (("--hr-resize-x",), "hires width in pixels instead of --hr-scale (0: use the scale)"),
    "hr_resize_y": (("--hr-resize-y",), "hires height in pixels instead of --hr-scale (0: use the scale)"),
    "hr_upscaler": (("--hr-upscaler",), "latent|latent-nearest|latent-bicubic|latent-antialiased|lanczos, or an A1111 "
                                        "label ('Latent (bicubic)')"),
    "hr_denoising_strength": (("--hr-denoising-strength",), "how much the second pass repaints, 0..1"),
    "hr_second_pass_steps": (("--hr-steps",), "steps the second pass runs (0: steps x strength)"),
    "hr_sampler": (("--hr-sampler",), "second-pass sampler (default: --sampler)"),
    "hr_scheduler": (("--hr-scheduler",), "second-pass schedule (default: --scheduler)"),
    "hr_prompt": (("--hr-prompt",), "second-pass prompt (default: the prompt)"),
    "hr_negative_prompt": (("--hr-negative-prompt",), "second-pass negative prompt (default: the negative prompt)"),
    "hr_cfg_scale": (("--hr-cfg-scale",), "second-pass guidance scale (default: --cfg-scale)"),
}
IMG2IMG_FLAGS = {
    "denoising_strength": (("--denoising-strength", "--strength"), "how much to repaint: 0 keeps the image, 1 "
                                                                   "replaces it"),
    "resize_mode": (("--resize-mode",), "fit the image to --width/--height: just_resize|crop_and_resize|"
                                        "resize_and_fill"),
}
INPAINT_FLAGS = {
    "mask_blur": (("--mask-blur",), "blur radius of the mask edge in pixels"),
    "inpainting_fill": (("--inpainting-fill",), "what the masked area starts from: original|fill|latent-noise|"
                                                "latent-nothing"),
    "inpaint_full_res": (("--inpaint-full-res",), "repaint only the masked region at full resolution"),
    "inpaint_full_res_padding": (("--inpaint-full-res-padding",), "context pixels around the region"),
    "inpainting_mask_invert": (("--invert-mask",), "repaint the black part of the mask instead of the white"),
}
REFINER_FLAGS = {
    "refiner_checkpoint": (("--refiner",), "an SDXL refiner (path or name from `easel models`) that takes over the "
                                           "last steps"),
    "refiner_switch_at": (("--refiner-switch-at",), "fraction of the steps the base model runs before the refiner"),
}
OUTPAINT_FLAGS = {f"outpaint_{side}": ((f"--{side}",), f"pixels to add on the {side}") for side in
                  ("left", "right", "up", "down")}
ALL_FLAGS = {**REQUEST_FLAGS, **HIRES_FLAGS, **REFINER_FLAGS, **IMG2IMG_FLAGS, **INPAINT_FLAGS, **OUTPAINT_FLAGS}
FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(GenerationRequest)}
log = logging.getLogger("easel")


def add_request_flags(p: argparse.ArgumentParser, table: dict | None = None) -> None:
    """Flags for every request field in `table` (default REQUEST_FLAGS; default None: 'not given')."""
    for name, (flags, help_text) in (REQUEST_FLAGS if table is None else table).items():
        default = next(f.default for f in dataclasses.fields(GenerationRequest) if f.name == name)
        kind_name = str(FIELD_TYPES[name]).split(" ")[0].split("|")[0].strip()
        if kind_name == "bool":
            p.add_argument(*flags, dest=name, action="store_true", default=None, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(kind_name, str)
        p.add_argument(*flags, dest=name, type=kind, default=None, help=help_with_default(help_text, default))
    if table is None:  # flags that are not one field each
        p.add_argument("--seed-resize-from", metavar="WxH", help="make the variation noise as if the image were WxH "
                       "(keeps a composition when changing the size)")
        p.add_argument("--lora", dest="loras", action="append", metavar="NAME_OR_PATH:WEIGHT",
                       help="apply a LoRA (repeatable; same as <lora:name:weight> in the prompt)")
        add_prompt_tool_flags(p)


def add_prompt_tool_flags(p: argparse.ArgumentParser) -> None:
    """--style, --styles-file, --wildcards: A1111 styles and the folders of wildcard files."""
    p.add_argument("--style", dest="styles", action="append", metavar="NAME",
                   help="apply an A1111 style from styles.csv by name (repeatable, applied in order)")
    p.add_argument("--styles-file", action="append", metavar="CSV", help="an A1111 styles.csv (repeatable; "
                   "default: $EASEL_STYLES, ./styles.csv)")
    p.add_argument("--wildcards", action="append", metavar="DIR", help="a folder of wildcard files name.txt for "
                   "__name__ (repeatable; default: $EASEL_WILDCARDS, ./wildcards)")


def use_prompt_folders(args: argparse.Namespace) -> None:
    """Put --styles-file and --wildcards first in $EASEL_STYLES / $EASEL_WILDCARDS, where every request of this
    process looks (the one place styles and wildcards are applied reads them)."""
    for flag, env in (("styles_file", "EASEL_STYLES"), ("wildcards", "EASEL_WILDCARDS")):
        given = [str(Path(v).resolve()) for v in getattr(args, flag, None) or []]
        if given:
            os.environ[env] = os.pathsep.join([*given, *filter(None, [os.environ.get(env)])])


def help_with_default(help_text: str, default) -> str:
    """The help text with the schema's default, unless the text already says it (or there is none to say)."""
    if "default" in help_text or default in (None, "", dataclasses.MISSING):
        return help_text
    return f"{help_text} (default: {default})"


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --vae, --tokenizer, --dtype, --device, --prediction."""
    p.add_argument("--model", "-m", help="model: .safetensors/.ckpt file, diffusers folder, name from "
                                         "`easel models`, or hub id (default: the built-in model)")
    p.add_argument("--vae", help="a separate VAE file or folder that replaces the model's VAE")
    p.add_argument("--tokenizer", help="tokenizer folder, vocab.json or CLIP bpe .gz (for single files without one)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                   help="compute dtype (default fp32; auto: bf16 on CPUs with AVX512-BF16 or AMX, else fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")


def request_from_args(args: argparse.Namespace, base: dict | None = None) -> GenerationRequest:
    """Flags given on the command line override `base` (e.g. an image's parameters), which overrides defaults."""
    fields = dict(base or {})
    if getattr(args, "prompt", None) is not None:
        fields["prompt"] = args.prompt
    for name in ALL_FLAGS:
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "loras", None):
        fields["loras"] = list(args.loras)
    if getattr(args, "controlnets", None):
        fields["controlnets"] = control_units(args.controlnets)
    if getattr(args, "styles", None):
        fields["styles"] = list(args.styles)
    use_prompt_folders(args)
    if getattr(args, "seed_resize_from", None):
        fields["seed_resize_from_w"], fields["seed_resize_from_h"] = parse_size(args.seed_resize_from,
                                                                                "--seed-resize-from")
    known = {f.name for f in dataclasses.fields(GenerationRequest)}
    return GenerationRequest(**{k: v for k, v in fields.items() if k in known})


def parse_size(text: str, flag: str) -> tuple[int, int]:
    """'512x768' -> (512, 768); errors name the flag."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{flag} takes WIDTHxHEIGHT in pixels, e.g. 512x512 (got {text!r})") from None
    return w, h


def read_image(path: str, what: str = "image") -> Image.Image:
    """Open an image file fully (after checking the size its header announces), with errors naming the file."""
    from easel.pipelines.metadata import open_image
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {path}" if not p.is_dir() else f"{what} {path} is a folder, "
                                "not an image file")
    return open_image(p, what=f"{what} {path}")


def params_from_image(path: str) -> dict:
    """Generation parameters stored in an image (easel's JSON, else A1111's parameters text)."""
    from easel.pipelines.metadata import read_image_params
    params = read_image_params(path)
    if not params:
        raise ValueError(f"{path} carries no generation parameters (no 'parameters' or 'easel' PNG text chunk, "
                         "no EXIF UserComment)")
    return params


def cmd_generate(args: argparse.Namespace) -> int:
    """easel generate PROMPT ..."""
    base = from_image_fields(args) if args.from_image else {}
    if args.prompt is None and not base:
        raise ValueError("give a PROMPT (or --from IMAGE.png to reproduce an image)")
    req = request_from_args(args, base)
    model = args.model or (model_of_image(base) if args.from_image else None)
    return run_and_save(args, req, model)


def from_image_fields(args: argparse.Namespace) -> dict:
    """The request fields `--from IMAGE` reproduces: the image's own, as ONE image (its seed is already its own
    seed within its batch), with a sampler given on the command line bringing its own schedule."""
    base = params_from_image(args.from_image)
    base.update(batch_size=1, n_iter=1)  # flags given (-n, --n-iter) still win: request_from_args applies them last
    for sampler, scheduler in (("sampler", "scheduler"), ("hr_sampler", "hr_scheduler")):
        if getattr(args, sampler, None) is not None and getattr(args, scheduler, None) is None:
            base.pop(scheduler, None)  # "--sampler 'Euler a'" alone: not the image's schedule
    eta = args.eta if args.eta is not None else base.get("eta")
    warn_unhonoured_ensd(base, args.sampler or base.get("sampler"), eta)
    return base


# Samplers that draw no noise after the start: A1111's ENSD (which offsets the seed of that noise) changes nothing.
_NOISELESS_SAMPLERS = {"euler", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "plms", "uni_pc", "uni_pc_bh2"}


def warn_unhonoured_ensd(base: dict, sampler: str | None, eta: float | None) -> None:
    """Say so when the image used A1111's 'Eta noise seed delta' with a sampler whose noise it changes: easel
    keeps the value in the request but its samplers do not apply it, so that image cannot be matched exactly."""
    ensd = (base.get("extra") or {}).get("eta_noise_seed_delta")
    if not ensd:
        return
    from easel.pipelines import names
    try:
        name = names.resolve_sampler(sampler or "dpmpp_2m")[0]
    except ValueError:
        name = sampler
    if name in _NOISELESS_SAMPLERS and not eta:
        return
    log.warning("the image was made with ENSD %s (A1111's eta noise seed delta); easel keeps it in the request but "
                "its samplers do not apply it, so %s's per-step noise and the image will differ from the original",
                ensd, name)


def model_of_image(params: dict) -> str | None:
    """The known model an image names (`Model`, `Model hash`), or None (the built-in model) with a warning
    naming the one that was not found."""
    name, model_hash = params.get("model"), params.get("model_hash")
    if not name and not model_hash:
        return None
    from easel.weights.registry import find_model
    entry = find_model(name, model_hash)
    if entry is None:
        log.warning("the image was made with model %s, which easel does not find among its models (`easel "
                    "models`); using the built-in model: pass --model to choose one", _model_label(name, model_hash))
        return None
    if entry.kind != "built-in":
        print(f"model from the image: {entry.name} ({entry.path})", file=sys.stderr)
    return None if entry.kind == "built-in" else str(entry.path)


def _model_label(name: str | None, model_hash: str | None) -> str:
    return " ".join(filter(None, [repr(name) if name else None, f"[{model_hash}]" if model_hash else None]))


def cmd_img2img(args: argparse.Namespace) -> int:
    """easel img2img IMAGE PROMPT ..."""
    req = request_from_args(args)
    req.init_images = [read_image(args.image, "image")]
    return run_and_save(args, req, args.model)


def cmd_inpaint(args: argparse.Namespace) -> int:
    """easel inpaint IMAGE MASK PROMPT ..."""
    req = request_from_args(args)
    image = read_image(args.image, "image")
    mask = read_image(args.mask, "mask").convert("L")
    if mask.size != image.size:  # a mask drawn at another resolution still marks the same region
        log.info("resizing the mask from %dx%d to the image's %dx%d", *mask.size, *image.size)
        mask = mask.resize(image.size, Image.BILINEAR)
    req.init_images, req.mask = [image], mask
    return run_and_save(args, req, args.model)


def cmd_outpaint(args: argparse.Namespace) -> int:
    """easel outpaint IMAGE PROMPT --left/--right/--up/--down N ..."""
    req = request_from_args(args)
    if not any(getattr(req, f"outpaint_{side}") for side in ("left", "right", "up", "down")):
        raise ValueError("outpaint needs at least one of --left, --right, --up, --down (pixels to add)")
    req.init_images = [read_image(args.image, "image")]
    return run_and_save(args, req, args.model)


def run_and_save(args: argparse.Namespace, req: GenerationRequest, model: str | None) -> int:
    """Check the request, load the model, run the request's mode and write numbered PNGs with parameters,
    each batch as soon as it is finished (a kill or an error later keeps the batches done so far)."""
    import easel
    from easel.pipelines.networks import requested_networks
    req.check()  # fail before the (slow) model load
    requested_networks(req)  # an unknown LoRA too (the error lists the LoRAs there are)
    pipe = easel.load(model, dtype=args.dtype, device=args.device, vae=args.vae, tokenizer=args.tokenizer,
                      prediction=args.prediction, compile=getattr(args, "compile", False))
    out = Path(args.out)
    sink = preview_sink(out, req)
    with progress_bar(req) as cb:
        pipe.generate(req, callback=cb, preview_sink=sink, on_batch=lambda batch: save_batch(out, batch))
    return 0


def save_batch(out: Path, batch: list) -> None:
    """Write one finished batch as numbered PNGs (atomically: never a partial PNG) and print their paths."""
    from easel.pipelines.metadata import save_png
    for r in batch:
        print(save_png(r.image, next_image_path(out, r.params["seed"]), r.params), flush=True)


def preview_sink(out: Path, req: GenerationRequest):
    """With --preview-every N: a sink writing the frames to <out>/previews/<number of the first image>/, said on
    stderr before sampling starts (so they can be watched); else None."""
    if req.preview_every <= 0:
        return None
    from easel.pipelines.preview import write_preview_frames
    from easel.files import next_image_number
    folder = out / "previews" / f"{next_image_number(out):05d}"
    print(f"previews every {req.preview_every} steps ({req.preview_mode}): {folder}", file=sys.stderr)
    return write_preview_frames(folder)


class progress_bar:
    """A tqdm bar over all steps of all batches (and passes), fed by the step callback."""

    def __init__(self, req: GenerationRequest):
        from easel.pipelines.plan import count_steps
        self.total = count_steps(req)

    def __enter__(self):
        from tqdm import tqdm
        self.bar = tqdm(total=self.total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)
        return lambda d: self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()


def next_image_path(out: Path, seed: int) -> Path:
    """A1111-style numbered file name: 00007-<seed>.png, never overwriting."""
    from easel.files import next_image_number
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{next_image_number(out):05d}-{seed}.png"


def cmd_info(args: argparse.Namespace) -> int:
    """easel info IMAGE.png"""
    from easel.pipelines.metadata import params_from_metadata, read_image_metadata
    stored = read_image_metadata(args.image)
    if not stored["parameters"] and not stored["easel"]:
        raise ValueError(f"{args.image} carries no generation parameters")
    if args.json:
        print(json.dumps(params_from_metadata(stored), indent=2))
    else:
        print(stored["parameters"] or json.dumps(stored["easel"], indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """easel models"""
    from easel.weights.registry import list_models, model_dirs
    entries = list_models()
    for e in entries:
        print(f"{e.name:40s} {e.kind:12s} {e.path}")
    if not entries:
        print("no models found; searched: " + ", ".join(str(d) for d in model_dirs()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """easel convert SRC DST --to diffusers|single-file"""
    from easel.weights.model_io import load_model, save_model
    loaded = load_model(args.src, dtype=args.dtype, tokenizer=args.tokenizer, prediction=args.prediction)
    print(save_model(loaded, args.dst, args.to))
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    """easel samplers: list sampler and scheduler names."""
    from easel.samplers import SAMPLER_LABELS, SAMPLERS, SCHEDULES
    print("samplers:   " + ", ".join(f"{n} ({SAMPLER_LABELS.get(n, n)})" for n in SAMPLERS))
    print("schedulers: " + ", ".join(SCHEDULES))
    return 0


def cmd_tokenizer_install(args: argparse.Namespace) -> int:
    """easel tokenizer install PATH: put a CLIP vocabulary into easel's cache for single-file checkpoints."""
    from easel.text.tokenizer import install, load_path
    kinds = ["clip-l", "openclip"] if args.kind == "both" else [args.kind]
    for kind in kinds:
        print(install(load_path(args.path, kind), kind))  # load_path reads a .gz BPE file as well
    return 0


def cmd_world_sample(args: argparse.Namespace) -> int:
    """easel world sample: a grid of ShapeWorld renders with their captions."""
    from easel.world.dataset import sample_grid
    if args.n < 1:
        raise ValueError("-n must be at least 1")
    print(sample_grid(args.n, args.seed, args.out, size=args.size))
    return 0


def _eval_layout(pipe, settings, args: argparse.Namespace) -> int:
    """easel eval --controlnet: objects on their sketched blobs, with and without the ControlNet."""
    import json
    from tqdm import tqdm
    from easel.files import save_image, write_text
    from easel.world.benchmark import CORE_CATEGORIES
    from easel.world.layout_eval import layout_markdown, layout_sheet, run_layout_eval
    overrides = {k: v for k in ("steps", "sampler", "scheduler", "cfg_scale") if (v := getattr(settings, k)) is not None}
    total = 2 * len(CORE_CATEGORIES) * settings.per_category * settings.images_per_prompt
    with tqdm(total=total, unit="image", file=sys.stderr, leave=False) as bar:
        report = run_layout_eval(pipe, args.controlnet, settings.per_category, settings.images_per_prompt,
                                 args.control_weight, settings.seed, overrides,
                                 progress=lambda i: bar.update(i - bar.n))
    out = Path(args.out)
    sheet = layout_sheet(report)
    save_image(sheet, out / "layout.png")
    table = layout_markdown(report)
    write_text(out / "layout.md", table + "\n")
    write_text(out / "layout.json", json.dumps({k: v for k, v in report.items() if k not in ("images", "cases")},
                                               indent=2))
    print(table)
    print(f"report: {out / 'layout.json'}; sketches and images: {out / 'layout.png'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """easel eval: the ShapeWorld benchmark on a model."""
    import easel
    from tqdm import tqdm
    from easel.world.evaluate import EvalSettings, run_eval
    settings = EvalSettings(per_category=args.per_category, images_per_prompt=args.images_per_prompt,
                            steps=args.steps, sampler=args.sampler, scheduler=args.scheduler,
                            cfg_scale=args.cfg_scale, seed=args.seed, loras=args.lora, lang=args.lang)
    if settings.per_category < 1 or settings.images_per_prompt < 1:
        raise ValueError("--per-category and --images-per-prompt must be at least 1")
    pipe = easel.load(args.model, dtype=args.dtype, device=args.device)
    if args.controlnet:
        return _eval_layout(pipe, settings, args)
    from easel.world.benchmark import CATEGORIES
    n_prompts = len(CATEGORIES) * settings.per_category
    with tqdm(total=n_prompts, unit="prompt", file=sys.stderr, leave=False) as bar:
        report = run_eval(pipe, settings, args.out, progress=lambda i: bar.update(i - bar.n))
    from easel.world.benchmark import report_markdown
    print(report_markdown(report["rows"]))
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """easel batch FILE: every line's images, compatible lines batched, resumable, sharded by torchrun's RANK."""
    import easel
    from easel.pipelines.batch_run import BatchFileError, pending_groups, read_batch_file, run_batch, shard
    from easel.pipelines.networks import requested_networks
    if args.seed is not None and args.seed < 0:
        raise ValueError("easel batch needs a fixed --seed (0 or more): a resumed or sharded run must draw the same "
                         "seeds; leave it out for 0")
    lines = read_batch_file(args.file, batch_defaults(args), args.seed or 0)
    errors = []
    for line in lines:  # an unknown LoRA fails now, before the model load, naming its line
        try:
            requested_networks(line.request)
        except (ValueError, OSError) as e:
            errors.append(f"line {line.number}: {error_line(e)}")
    if errors:
        raise BatchFileError(args.file, errors)
    rank, world = shard()
    todo, skipped = pending_groups(lines, args.out, args.max_batch, rank, world)
    shard_text = f" (process {rank + 1} of {world})" if world > 1 else ""
    written = []
    if todo:  # a finished run (or shard) needs no model
        pipe = easel.load(args.model, dtype=args.dtype, device=args.device, vae=args.vae, tokenizer=args.tokenizer,
                          prediction=args.prediction, compile=args.compile)
        written = run_batch(pipe, todo, args.out, on_image=lambda p: print(p, flush=True),
                            desc=f"batch {rank + 1}/{world}" if world > 1 else "batch")
    print(f"batch{shard_text}: {len(written)} images written, {skipped} already there, in {args.out}",
          file=sys.stderr)
    return 0


def batch_defaults(args: argparse.Namespace) -> dict:
    """The request fields given as flags to `easel batch` (every line's defaults; its own fields win)."""
    fields = {name: getattr(args, name) for name in ALL_FLAGS if getattr(args, name, None) is not None}
    fields.pop("seed", None)  # --seed is the first line's seed; later lines count up from it
    if args.loras:
        fields["loras"] = list(args.loras)
    if args.styles:
        fields["styles"] = list(args.styles)
    use_prompt_folders(args)
    if args.seed_resize_from:
        fields["seed_resize_from_w"], fields["seed_resize_from_h"] = parse_size(args.seed_resize_from,
                                                                                "--seed-resize-from")
    return fields


def add_batch_parser(sub) -> None:
    """The `batch` sub-command."""
    b = sub.add_parser("batch", help="many images from a file: one prompt or JSON request per line, resumable, "
                                     "shardable with torchrun")
    b.add_argument("file", help="text file: one prompt per line, or one JSON object of request fields per line "
                                "(e.g. {\"prompt\": \"a red star\", \"steps\": 8}); blank and # lines skipped")
    add_generation_flags(b, HIRES_FLAGS)
    b.add_argument("--max-batch", type=int, default=4, help="images sampled together in one model batch, joining "
                   "consecutive lines of the same size, steps and sampler (default 4)")
    add_compile_flag(b)
    b.set_defaults(func=cmd_batch)


def cmd_xyz(args: argparse.Namespace) -> int:
    """easel xyz PROMPT --x FIELD=v1,v2 [--y ...] [--z ...]: every combination, a labelled grid and each cell."""
    import easel
    from easel import xyz
    axes = [xyz.parse_axis(name, spec) for name in ("x", "y", "z") for spec in [getattr(args, name)] if spec]
    req = request_from_args(args)
    if args.init_image:
        req.init_images = [read_image(args.init_image, "--init-image")]
    xyz.validate(req, axes)  # every axis value checked before the (slow) model load
    options = dict(dtype=args.dtype, device=args.device, vae=args.vae, tokenizer=args.tokenizer,
                   prediction=args.prediction)
    by_axis = any(a.field == "model" for a in axes)  # then every cell runs on an axis checkpoint: load no other
    pipe = None if by_axis else easel.load(args.model, **options)
    result = xyz.plot(pipe, req, axes, load=lambda spec: easel.load(spec, **options), progress=True)
    grid, cells = result.save(args.out)
    print(grid, flush=True)
    print(f"xyz: {len(cells)} cells in {cells[0].parent}", file=sys.stderr)
    return 0


def add_xyz_parser(sub) -> None:
    """The `xyz` sub-command."""
    x = sub.add_parser("xyz", help="X/Y/Z plot: a labelled grid over up to three axes of request values")
    x.add_argument("prompt", nargs="?", default="", help="what to draw")
    for name in ("x", "y", "z"):
        x.add_argument(f"--{name}", metavar="FIELD=V1,V2,...", help=f"{name.upper()} axis: a request field "
                       "(steps, cfg_scale, sampler, scheduler, seed, width, denoising_strength, ...), size=64x64,.., "
                       "model=CKPT,.. or prompt_sr=SEARCH,REPLACE,..; numbers take ranges 1-5, 1-10 (+2), 5-15 [3]")
    add_generation_flags(x, HIRES_FLAGS, IMG2IMG_FLAGS, REFINER_FLAGS)
    x.add_argument("--init-image", help="an image to start from (img2img cells: plot denoising_strength)")
    x.set_defaults(func=cmd_xyz, out="xyz.png")
    x.epilog = "--out: the grid's .png (cells go to <name>-cells/ beside it) or a folder (xyz.png inside)"


def add_compile_flag(p: argparse.ArgumentParser) -> None:
    """--compile: the UNet through torch.compile, compiled code cached on disk."""
    p.add_argument("--compile", action="store_true", help="run the UNet through torch.compile (slow first run; "
                   "the compiled code is cached on disk for the next ones)")


def add_generation_flags(p: argparse.ArgumentParser, *tables: dict) -> None:
    """The request flags every generating command takes, the given mode tables, model flags and --out."""
    add_request_flags(p)
    for table in tables:
        add_request_flags(p, table)
    add_model_flags(p)
    p.add_argument("--out", "-o", default="outputs", help="output folder (default: outputs)")


# --control-* flag -> ControlUnit field; each sets the unit of the --controlnet before it.
CONTROL_FLAGS = {"--control-image": ("image", str, "the condition image of that ControlNet (default in img2img and "
                                     "inpaint: the init image)"),
                 "--control-weight": ("weight", float, "how strongly it steers, 0-2 (default 1)"),
                 "--control-start": ("guidance_start", float, "fraction of the steps before which it is off "
                                     "(default 0)"),
                 "--control-end": ("guidance_end", float, "fraction of the steps after which it is off (default 1)"),
                 "--control-mode": ("control_mode", str, "balanced | prompt (My prompt is more important) | control "
                                    "(ControlNet is more important)"),
                 "--control-resize": ("resize_mode", str, "just_resize | crop_and_resize (default) | resize_and_fill"),
                 "--preprocessor": ("preprocessor", str, "none (default), canny, threshold, scribble, lineart, invert, "
                                    "segmentation, inpaint"),
                 "--threshold-a": ("threshold_a", float, "the preprocessor's first parameter (canny: low threshold)"),
                 "--threshold-b": ("threshold_b", float, "the preprocessor's second parameter (canny: high threshold)")}


class _ControlFlag(argparse.Action):
    """--controlnet starts a ControlNet unit; the --control-* flags after it set that unit's options, so several
    ControlNets are given one after the other."""

    def __call__(self, parser, namespace, value, option_string=None):
        units = getattr(namespace, "controlnets", None) or []
        field = CONTROL_FLAGS.get(option_string, ("model",))[0]
        if field == "model":
            units.append({"model": value})
        elif not units:
            parser.error(f"{option_string} must follow the --controlnet it belongs to")
        elif field in units[-1]:
            parser.error(f"{option_string} given twice for ControlNet {len(units)} ({units[-1]['model']}): each "
                         "--controlnet takes its own --control-* flags after it")
        else:
            units[-1][field] = value
        namespace.controlnets = units


def add_control_flags(p: argparse.ArgumentParser) -> None:
    """--controlnet NAME_OR_PATH and the --control-* flags of that unit (repeatable, grouped in order)."""
    g = p.add_argument_group("ControlNet (repeat --controlnet for several; the flags after one belong to it)")
    g.add_argument("--controlnet", action=_ControlFlag, default=argparse.SUPPRESS, metavar="NAME_OR_PATH",
                   help="a ControlNet file or diffusers folder, or a name from the ControlNet folders")
    for flag, (_, kind, help_text) in CONTROL_FLAGS.items():
        metavar = "IMG" if flag == "--control-image" else ("X" if kind is float else "NAME")
        g.add_argument(flag, action=_ControlFlag, type=kind, default=argparse.SUPPRESS, metavar=metavar,
                       help=help_text)


def control_units(units: list[dict]) -> list[dict]:
    """The --controlnet groups as ControlUnit fields, images read from their files."""
    out = []
    for i, unit in enumerate(units):
        unit = dict(unit)
        if unit.get("image") is not None:
            unit["image"] = read_image(unit["image"], f"--control-image of ControlNet {i + 1}")
        out.append(unit)
    return out


def add_edit_parsers(sub) -> None:
    """img2img, inpaint and outpaint sub-commands."""
    i = sub.add_parser("img2img", help="repaint an image guided by a prompt")
    i.add_argument("image", help="the image to start from")
    i.add_argument("prompt", nargs="?", default="", help="what to draw")
    add_generation_flags(i, IMG2IMG_FLAGS, REFINER_FLAGS)
    add_control_flags(i)
    i.set_defaults(func=cmd_img2img)

    m = sub.add_parser("inpaint", help="repaint the white part of a mask")
    m.add_argument("image", help="the image to edit")
    m.add_argument("mask", help="mask image: white = repaint, black = keep (resized to the image if needed)")
    m.add_argument("prompt", nargs="?", default="", help="what to draw in the masked area")
    add_generation_flags(m, IMG2IMG_FLAGS, INPAINT_FLAGS)
    add_control_flags(m)
    m.set_defaults(func=cmd_inpaint)

    o = sub.add_parser("outpaint", help="extend an image beyond its borders")
    o.add_argument("image", help="the image to extend")
    o.add_argument("prompt", nargs="?", default="", help="what to draw in the new area")
    add_generation_flags(o, OUTPAINT_FLAGS, IMG2IMG_FLAGS, INPAINT_FLAGS)
    o.set_defaults(func=cmd_outpaint)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="easel", description="Stable Diffusion you can run, train and see inside.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: EASEL_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt", nargs="?", help="what to draw")
    add_generation_flags(g, HIRES_FLAGS, REFINER_FLAGS)
    add_control_flags(g)
    g.add_argument("--from", dest="from_image", help="reproduce the image whose parameters this PNG carries")
    add_compile_flag(g)
    g.set_defaults(func=cmd_generate)
    add_edit_parsers(sub)
    add_batch_parser(sub)
    add_xyz_parser(sub)

    i = sub.add_parser("info", help="print the generation parameters stored in a PNG")
    i.add_argument("image")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(func=cmd_info)

    sub.add_parser("models", help="list the models easel can find").set_defaults(func=cmd_models)
    sub.add_parser("samplers", help="list samplers and schedulers").set_defaults(func=cmd_samplers)

    t = sub.add_parser("tokenizer", help="manage tokenizers for single-file checkpoints")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    ti = tsub.add_parser("install", help="copy a CLIP vocabulary (bpe .gz, vocab.json or folder) into the cache")
    ti.add_argument("path")
    ti.add_argument("--kind", default="both", choices=["clip-l", "openclip", "both"],
                    help="which encoders it serves (they share CLIP's vocabulary; only the pad token differs)")
    ti.set_defaults(func=cmd_tokenizer_install)

    w = sub.add_parser("world", help="ShapeWorld, the captioned world easel trains on")
    wsub = w.add_subparsers(dest="world_command", required=True)
    ws = wsub.add_parser("sample", help="write a grid of renders with their captions")
    ws.add_argument("-n", type=int, default=16, help="number of scenes (default 16)")
    ws.add_argument("--seed", type=int, default=0)
    ws.add_argument("--size", type=int, default=64, choices=[64, 128])
    ws.add_argument("--out", default="shapeworld-sample.png")
    ws.set_defaults(func=cmd_world_sample)

    e = sub.add_parser("eval", help="GenEval-style ShapeWorld benchmark of a model")
    e.add_argument("--model", "-m", help="model to evaluate (default: the built-in model)")
    e.add_argument("--per-category", type=int, default=32, help="prompts per category (default 32)")
    e.add_argument("--lang", default="en", choices=["en", "zh"], help="the prompts' language: en or zh (default en)")
    e.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default 4)")
    e.add_argument("--steps", type=int)
    e.add_argument("--sampler")
    e.add_argument("--scheduler")
    e.add_argument("--cfg-scale", type=float)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--lora", action="append", default=[], metavar="NAME_OR_PATH:WEIGHT",
                   help="apply a LoRA to every image (repeatable), e.g. an LCM-LoRA with --sampler lcm --steps 4")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    e.add_argument("--device", default="cpu")
    e.add_argument("--controlnet", metavar="NAME_OR_PATH",
                   help="evaluate a layout ControlNet (e.g. shapeworld-layout): each image drawn with a sketch of where "
                        "its objects go; reports how many objects land on their blobs, with and without it")
    e.add_argument("--control-weight", type=float, default=1.0, help="the layout ControlNet's weight (default 1)")
    e.add_argument("--out", default="eval", help="folder for report.json, report.md and grids (default: eval)")
    e.set_defaults(func=cmd_eval)

    from easel.training.cli import add_train_parser
    add_train_parser(sub)
    from easel.serve.cli import add_serve_parser  # imported here, not at the top: `easel generate` needs no server
    add_serve_parser(sub)
    from easel.inspect.cli import add_inspect_parsers  # given this module's helpers: no import back (no cycle)
    add_inspect_parsers(sub, sys.modules[__name__])
    from easel.weights.merge import add_merge_parser  # torch loads only when a merge runs
    add_merge_parser(sub)
    from easel.upscale.cli import add_upscale_parser  # given this module, as inspect: no import back
    add_upscale_parser(sub, sys.modules[__name__])
    from easel.animate import add_animate_parser
    add_animate_parser(sub, sys.modules[__name__])

    c = sub.add_parser("convert", help="convert between a single .safetensors file and a diffusers folder")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", required=True, choices=["diffusers", "single-file"])
    c.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the written weights")
    c.add_argument("--tokenizer", help="tokenizer to bundle when the source has none")
    c.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    c.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command; known errors print one clear line (exit code 2) instead of a stack trace,
    unless --debug (or EASEL_DEBUG=1) asks for it."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except KNOWN_ERRORS as e:
        if args.debug or os.environ.get("EASEL_DEBUG", "") not in ("", "0"):
            raise
        print(f"easel: error: {error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
