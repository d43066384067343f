"""`easel ...` command line: generate, info, models, convert (more sub-commands register themselves here)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from easel.pipelines.request import GenerationRequest

# Request field -> (flags, help). The request schema drives the flags; defaults come from the schema.
REQUEST_FLAGS = {
    "negative_prompt": (("--negative-prompt", "--neg"), "what the image should not show"),
    "batch_size": (("-n", "--batch-size"), "images per batch (default: the model's default)"),
    "n_iter": (("--n-iter", "--batch-count"), "number of batches"),
    "steps": (("--steps",), "sampling steps"),
    "cfg_scale": (("--cfg-scale", "--cfg"), "classifier-free guidance scale"),
    "sampler": (("--sampler",), "sampler name (easel or A1111 label); see `easel samplers`"),
    "scheduler": (("--scheduler",), "sigma schedule; see `easel samplers`"),
    "seed": (("--seed",), "seed of the first image (-1: random); later images count up"),
    "width": (("--width", "-W"), "width in pixels, multiple of 8 (default: the model's size)"),
    "height": (("--height", "-H"), "height in pixels, multiple of 8 (default: the model's size)"),
    "clip_skip": (("--clip-skip",), "use an earlier CLIP layer (A1111's clip skip)"),
    "eta": (("--eta",), "noise multiplier of ancestral/SDE samplers"),
}
FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(GenerationRequest)}
log = logging.getLogger("easel")


def add_request_flags(p: argparse.ArgumentParser) -> None:
    """Flags for every request field in REQUEST_FLAGS (default None: 'not given')."""
    for name, (flags, help_text) in REQUEST_FLAGS.items():
        default = next(f.default for f in dataclasses.fields(GenerationRequest) if f.name == name)
        kind = {"int": int, "float": float}.get(str(FIELD_TYPES[name]).split(" ")[0].split("|")[0].strip(), str)
        p.add_argument(*flags, dest=name, type=kind, default=None, help=f"{help_text} (default: {default})")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --vae, --tokenizer, --dtype, --device, --prediction."""
    p.add_argument("--model", "-m", help="model: .safetensors/.ckpt file, diffusers folder, name from "
                                         "`easel models`, or hub id (default: the built-in model)")
    p.add_argument("--vae", help="a separate VAE file or folder that replaces the model's VAE")
    p.add_argument("--tokenizer", help="tokenizer folder, vocab.json or CLIP bpe .gz (for single files without one)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")


def request_from_args(args: argparse.Namespace, base: dict | None = None) -> GenerationRequest:
    """Flags given on the command line override `base` (e.g. an image's parameters), which overrides defaults."""
    fields = dict(base or {})
    if getattr(args, "prompt", None) is not None:
        fields["prompt"] = args.prompt
    for name in REQUEST_FLAGS:
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    known = {f.name for f in dataclasses.fields(GenerationRequest)}
    return GenerationRequest(**{k: v for k, v in fields.items() if k in known})


def params_from_image(path: str) -> dict:
    """Request fields stored in a PNG (easel's JSON, else A1111's parameters text)."""
    from easel.pipelines.metadata import parse_infotext, read_png_params
    stored = read_png_params(path)
    if stored["easel"]:
        return stored["easel"]
    if not stored["parameters"]:
        raise ValueError(f"{path} carries no generation parameters (no 'parameters' or 'easel' PNG text chunk)")
    a = parse_infotext(stored["parameters"])
    out = {"prompt": a["prompt"], "negative_prompt": a["negative_prompt"]}
    conv = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
            "Clip skip": ("clip_skip", int), "Sampler": ("sampler", str), "Schedule type": ("scheduler", str)}
    for label, (name, kind) in conv.items():
        if label in a:
            out[name] = kind(a[label])
    if "Size" in a:
        out["width"], out["height"] = (int(v) for v in a["Size"].split("x"))
    if "scheduler" in out:
        from easel.samplers import resolve_sampler
        out["scheduler"] = resolve_sampler("euler " + out["scheduler"])[1] or out["scheduler"]
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    """easel generate PROMPT ..."""
    import easel
    from easel.pipelines.metadata import save_png
    base = params_from_image(args.from_image) if args.from_image else {}
    if args.prompt is None and not base:
        raise ValueError("give a PROMPT (or --from IMAGE.png to reproduce an image)")
    req = request_from_args(args, base)
    req.check()  # fail before the (slow) model load
    model = args.model or (base.get("model") if args.from_image and base.get("model") != "shapeworld" else None)
    pipe = easel.load(model, dtype=args.dtype, device=args.device, vae=args.vae, tokenizer=args.tokenizer,
                      prediction=args.prediction)
    with progress_bar(req, pipe) as cb:
        results = pipe.generate(req, callback=cb)
    out = Path(args.out)
    for r in results:
        path = save_png(r.image, next_image_path(out, r.params["seed"]), r.params)
        print(path)
    return 0


class progress_bar:
    """A tqdm bar over all steps of all batches, fed by the step callback."""

    def __init__(self, req: GenerationRequest, pipe):
        self.total = req.steps * req.n_iter

    def __enter__(self):
        from tqdm import tqdm
        self.bar = tqdm(total=self.total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)
        return lambda d: self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()


def next_image_path(out: Path, seed: int) -> Path:
    """A1111-style numbered file name: 00007-<seed>.png, never overwriting."""
    out.mkdir(parents=True, exist_ok=True)
    nums = [int(p.name.split("-")[0]) for p in out.glob("*.png") if p.name.split("-")[0].isdigit()]
    return out / f"{max(nums, default=-1) + 1:05d}-{seed}.png"


def cmd_info(args: argparse.Namespace) -> int:
    """easel info IMAGE.png"""
    from easel.pipelines.metadata import read_png_params
    stored = read_png_params(args.image)
    if not stored["parameters"] and not stored["easel"]:
        raise ValueError(f"{args.image} carries no generation parameters")
    if args.json:
        print(json.dumps(stored["easel"] or params_from_image(args.image), indent=2))
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
    from easel.text.tokenizer import install_bpe_gz, load_path
    kinds = ["clip-l", "openclip"] if args.kind == "both" else [args.kind]
    for kind in kinds:
        if args.path.endswith(".gz"):
            print(install_bpe_gz(args.path, kind))
        else:
            from easel.text.tokenizer import cache_dir
            print(load_path(args.path, kind).save(cache_dir(kind)))
    return 0


def cmd_world_sample(args: argparse.Namespace) -> int:
    """easel world sample: a grid of ShapeWorld renders with their captions."""
    from easel.world.dataset import sample_grid
    if args.n < 1:
        raise ValueError("-n must be at least 1")
    print(sample_grid(args.n, args.seed, args.out, size=args.size))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """easel eval: the ShapeWorld benchmark on a model."""
    import easel
    from tqdm import tqdm
    from easel.world.evaluate import EvalSettings, run_eval
    settings = EvalSettings(per_category=args.per_category, images_per_prompt=args.images_per_prompt,
                            steps=args.steps, sampler=args.sampler, scheduler=args.scheduler,
                            cfg_scale=args.cfg_scale, seed=args.seed)
    if settings.per_category < 1 or settings.images_per_prompt < 1:
        raise ValueError("--per-category and --images-per-prompt must be at least 1")
    pipe = easel.load(args.model, dtype=args.dtype, device=args.device)
    from easel.world.benchmark import CATEGORIES
    n_prompts = len(CATEGORIES) * settings.per_category
    with tqdm(total=n_prompts, unit="prompt", file=sys.stderr, leave=False) as bar:
        report = run_eval(pipe, settings, args.out, progress=lambda i: bar.update(i - bar.n))
    from easel.world.benchmark import report_markdown
    print(report_markdown(report["rows"]))
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="easel", description="Stable Diffusion you can run, train and see inside.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt", nargs="?", help="what to draw")
    add_request_flags(g)
    add_model_flags(g)
    g.add_argument("--from", dest="from_image", help="reproduce the image whose parameters this PNG carries")
    g.add_argument("--out", "-o", default="outputs", help="output folder (default: outputs)")
    g.set_defaults(func=cmd_generate)

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
    e.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default 4)")
    e.add_argument("--steps", type=int)
    e.add_argument("--sampler")
    e.add_argument("--scheduler")
    e.add_argument("--cfg-scale", type=float)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", default="eval", help="folder for report.json, report.md and grids (default: eval)")
    e.set_defaults(func=cmd_eval)

    from easel.training.cli import add_train_parser
    add_train_parser(sub)

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
    """Entry point: run a sub-command; known errors print one clear line instead of a stack trace."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as e:
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"easel: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
