"""`easel train all`: tokenizer -> CLIP -> VAE -> UNet, each stage resumable, then the built-in model.

Layout of the output folder (default runs/shapeworld/):
    tokenizer/   vocab.json merges.txt                    done.json
    clip/        checkpoint.pt log.jsonl loss.png text_encoder.safetensors clip.safetensors metrics.json done.json
    vae/         checkpoint.pt log.jsonl loss.png vae.safetensors metrics.json done.json
    unet/        latents.pt checkpoint.pt log.jsonl loss.png unet_raw/unet_ema.safetensors metrics.json done.json
    shapeworld.safetensors + shapeworld.tokenizer/        (the assembled model, loadable by `easel generate`)

A stage is skipped when its done.json exists and records the same inputs (file digests) as now: a
retrained VAE therefore re-runs the UNet stage (and re-encodes its latent cache) by itself.

Captions are bilingual (English and Chinese, `easel.world.captions`). `--init-from MODEL` warm-starts every
stage from a trained model instead of from scratch: its tokenizer extended with the Chinese characters (English
ids unchanged), its text encoder (new rows for the new tokens) and, when `clip_vision.safetensors` lies beside
it, its CLIP image tower; its VAE copied as is (pixels have no language); its UNet continued.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch

from easel.models.configs import ModelConfig
from easel.models.sd import StableDiffusion
from easel.pipelines.conditioning import VOCABULARY_KEY
from easel.text.tokenizer import CLIPTokenizer
from easel.training import presets
from easel.training.common import DistInfo, LoopConfig, TrainingError, barrier, resume_if_same_inputs, write_json
from easel.training.unet import file_digest
from easel.weights.model_io import LoadedModel

STAGES = ("tokenizer", "clip", "vae", "unet")
# Minutes per stage for the default ~75-minute run on two cores (see the lead's report for the measurements).
DEFAULT_MINUTES = {"clip": 10.0, "vae": 14.0, "unet": 45.0}
DEFAULT_LOOPS = {
    "clip": LoopConfig(batch_size=64, lr=5e-4, warmup=100, ema_decay=0.99, ckpt_every=100),
    "vae": LoopConfig(batch_size=32, lr=1e-3, warmup=100, ema_decay=0.995, bf16=True, ckpt_every=200),
    "unet": LoopConfig(batch_size=32, lr=1e-3, warmup=200, ema_decay=0.995, ckpt_every=250),
}
# A warm start (--init-from) continues trained weights: gentler peaks, shorter warm-ups.
INIT_LOOPS = {
    "clip": LoopConfig(batch_size=64, lr=3e-4, warmup=50, ema_decay=0.99, ckpt_every=100),
    "unet": LoopConfig(batch_size=32, lr=5e-4, warmup=100, ema_decay=0.995, ckpt_every=250),
}
INIT_TEXT_LR_SCALE = 0.3  # the warm-started text tower moves slower than the image tower (the UNet reads it)
MODEL_NAME = "shapeworld.safetensors"
TOWER_FILE = "clip_vision.safetensors"  # the CLIP image tower beside a model (vision.*, text_projection, logit_scale)
LANGS = ("en", "zh")
RELATION_SHARE = 0.4  # UNet and CLIP scenes drawn as relation scenes (the world's own mix has 25%)
MAX_MODEL_MB = 30


@dataclasses.dataclass
class Layout:
    """Where each stage reads and writes under the run folder, and the model every stage starts from (if any)."""

    root: Path
    init: Path | None = None

    def stage(self, name: str) -> Path:
        """Folder of a stage."""
        return self.root / name

    @property
    def tokenizer(self) -> Path:
        """Tokenizer folder (vocab.json, merges.txt)."""
        return self.root / "tokenizer"

    @property
    def text_encoder(self) -> Path:
        """Trained CLIP text encoder weights."""
        return self.root / "clip" / "text_encoder.safetensors"

    @property
    def bilingual_text_encoder(self) -> Path:
        """The text encoder after `python3 -m easel.training.bilingual` (used instead of CLIP's when present)."""
        return self.root / "bilingual" / "text_encoder.safetensors"

    @property
    def vae(self) -> Path:
        """Trained VAE weights with its config."""
        return self.root / "vae" / "vae.safetensors"

    @property
    def model(self) -> Path:
        """The assembled model file."""
        return self.root / MODEL_NAME


def _require(path: Path, stage: str, root: Path) -> Path:
    if not path.exists():
        raise TrainingError(f"{path} is missing: run `easel train {stage} --out {root}` first "
                            f"(or `easel train all --out {root}`)")
    return path


def stage_inputs(layout: Layout, stage: str) -> dict[str, str]:
    """Digests of the files a stage consumes (a change makes the stage stale)."""
    tok = [layout.tokenizer / "vocab.json", layout.tokenizer / "merges.txt"]
    need = {"tokenizer": [], "clip": tok, "vae": [], "unet": tok + [layout.text_encoder, layout.vae]}[stage]
    inputs = {str(p.relative_to(layout.root)): file_digest(p) for p in need if p.exists()}
    if layout.init is not None:
        inputs["init"] = _init_digest(layout.init)
    return inputs


@functools.lru_cache(maxsize=4)
def _init_digest(path: Path) -> str:
    return file_digest(path)


def is_done(layout: Layout, stage: str) -> bool:
    """True when the stage finished with the same inputs as are there now."""
    done = layout.stage(stage) / "done.json"
    return done.exists() and json.loads(done.read_text()).get("inputs") == stage_inputs(layout, stage)


def guard_resume(layout: Layout, stage: str, loop: LoopConfig, info: DistInfo) -> LoopConfig:
    """Never resume a checkpoint started on other inputs (e.g. a retrained tokenizer): start over instead."""
    return resume_if_same_inputs(loop, layout.stage(stage) / "inputs.json", stage_inputs(layout, stage), info,
                                 f"[{stage}] its inputs changed since the checkpoint was started: starting over")


def mark_done(layout: Layout, stage: str, metrics: dict) -> None:
    """Record a finished stage with its inputs and metrics."""
    write_json(layout.stage(stage) / "done.json", {"inputs": stage_inputs(layout, stage), "metrics": metrics})


# --- the four stages ------------------------------------------------------------------------------

def stage_tokenizer(layout: Layout, n_captions: int = 20000, info: DistInfo | None = None) -> dict:
    """Train the BPE on the caption corpus (rank 0; others wait)."""
    from easel.training.tokenizer import check_single_tokens, train_tokenizer
    from easel.world.captions import vocabulary
    info = info or DistInfo()
    metrics = {}
    if info.main:
        if layout.init is not None:
            tok = _extend_init_tokenizer(layout)
        else:
            tok = train_tokenizer(layout.tokenizer, n_captions)
        zh_chars = sorted(set("".join(vocabulary("zh"))))
        metrics = {"vocab_size": tok.vocab_size, "merges": len(tok.merges),
                   "multi_token_words": check_single_tokens(tok, vocabulary()),
                   "multi_token_zh_chars": check_single_tokens(tok, zh_chars)}
        mark_done(layout, "tokenizer", metrics)
    barrier(info)
    return metrics


def _extend_init_tokenizer(layout: Layout) -> CLIPTokenizer:
    """The init model's tokenizer with the Chinese characters appended, saved as this run's tokenizer."""
    from easel.files import atomic_folder
    from easel.training.tokenizer import extend_tokenizer
    from easel.world.captions import vocabulary
    tok, _ = extend_tokenizer(init_model(layout).tokenizers[0], vocabulary("zh"))
    with atomic_folder(layout.tokenizer, replace=True) as tmp:
        tok.save(tmp)
    return tok


@functools.lru_cache(maxsize=2)
def _load_init(path: Path) -> LoadedModel:
    from easel.weights.model_io import load_model
    return load_model(path)


def init_model(layout: Layout) -> LoadedModel:
    """The model the run warm-starts from (loaded once)."""
    if layout.init is None or not Path(layout.init).is_file():
        raise TrainingError(f"--init-from {layout.init}: no such model file")
    return _load_init(Path(layout.init))


def remap_token_rows(weights: dict[str, torch.Tensor], old: CLIPTokenizer, new: CLIPTokenizer,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """A text encoder's weights for a larger vocabulary: each old token's embedding row moves to its new id, rows
    of new tokens are drawn from the old rows' per-dimension mean and spread."""
    key = next(k for k in weights if k.endswith("token_embedding.weight"))
    rows = weights[key]  # (V_old, D)
    if rows.shape[0] != old.vocab_size:
        raise TrainingError(f"the init text encoder has {rows.shape[0]} token rows, its tokenizer {old.vocab_size}")
    gen = torch.Generator().manual_seed(seed)
    out = rows.mean(0) + rows.std(0) * torch.randn(new.vocab_size, rows.shape[1], generator=gen)  # (V_new, D)
    for token, i in old.vocab.items():
        out[new.vocab[token]] = rows[i]
    return {**weights, key: out.to(rows.dtype)}


def _init_clip_weights(layout: Layout) -> dict[str, torch.Tensor]:
    """ContrastiveCLIP weights from the init model: its text encoder (rows remapped) and its image tower if any."""
    from safetensors.torch import load_file
    loaded = init_model(layout)
    new = CLIPTokenizer.from_dir(layout.tokenizer)
    text = remap_token_rows(loaded.model.text_encoders[0].state_dict(), loaded.tokenizers[0], new)
    weights = {f"text.{k}": v.float() for k, v in text.items()}
    tower = Path(layout.init).parent / TOWER_FILE
    if tower.is_file():
        weights.update({k: v for k, v in load_file(str(tower)).items() if not k.startswith("text.")})
    return weights


def _vocab_size(layout: Layout) -> int:
    return CLIPTokenizer.from_dir(_require(layout.tokenizer, "tokenizer", layout.root)).vocab_size


def stage_clip(layout: Layout, base: ModelConfig, loop: LoopConfig, info: DistInfo | None = None,
               vision=None) -> dict:
    """Contrastive training of the text encoder against a ViT."""
    from easel.training.clip import BILINGUAL_MIX, ClipRun, train_clip
    text = presets.text_config_for(base.text_encoders[0], _vocab_size(layout))
    vision = vision or presets.VISION_PRESETS["tiny" if base.name == presets.TINY.name else "shapeworld"]
    vision = dataclasses.replace(vision, image_size=base.default_size)
    info = info or DistInfo()
    if layout.init is not None and loop.minutes is None and loop.steps == 0:
        return keep_init_clip(layout, text, vision, info)
    loop = guard_resume(layout, "clip", loop, info)
    init = _init_clip_weights(layout) if layout.init is not None else None
    run = ClipRun(layout.stage("clip"), layout.tokenizer, text, vision, loop, mix=BILINGUAL_MIX, init=init, langs=LANGS,
                  lr_scale={"text.": INIT_TEXT_LR_SCALE} if init is not None else None)
    metrics = train_clip(run, info)
    if info.main:
        mark_done(layout, "clip", metrics)
    return metrics


def keep_init_clip(layout: Layout, text, vision, info: DistInfo) -> dict:
    """`--clip-steps 0` with `--init-from`: the init model's CLIP as it is (token rows remapped), no training, so
    that the UNet it was trained with keeps reading the same English states."""
    from easel.training.clip import ContrastiveCLIP, save_clip
    from easel.training.common import warm_start
    metrics = {}
    if info.main:
        model = ContrastiveCLIP(text, vision)
        fresh = warm_start(model, _init_clip_weights(layout), "CLIP")
        if any(k.startswith("text.") for k in fresh):
            raise TrainingError(f"--clip-steps 0: the init model's text encoder lacks {fresh[0]}")
        save_clip(model, layout.stage("clip"))
        metrics = {"steps": 0, "kept_from": str(layout.init)}
        mark_done(layout, "clip", metrics)
    barrier(info)
    return metrics


def stage_vae(layout: Layout, base: ModelConfig, loop: LoopConfig, info: DistInfo | None = None) -> dict:
    """VAE training with object-weighted reconstruction, then latent standardisation."""
    from easel.training.vae import VaeRun, save_vae, train_vae
    info = info or DistInfo()
    if layout.init is not None:  # pixels have no language: the init model's VAE as it is
        metrics = {}
        if info.main:
            vae = init_model(layout).model.vae
            save_vae(vae, vae.config, layout.vae)
            metrics = {"copied_from": str(layout.init)}
            mark_done(layout, "vae", metrics)
        barrier(info)
        return metrics
    loop = guard_resume(layout, "vae", loop, info)
    metrics = train_vae(VaeRun(layout.stage("vae"), base.vae, loop, image_size=base.default_size), info)
    if info.main:
        mark_done(layout, "vae", metrics)
    return metrics


def stage_unet(layout: Layout, base: ModelConfig, loop: LoopConfig, info: DistInfo | None = None,
               n_latents: int = 60000, n_val: int = 512, text_lr_scale: float | None = None,
               ground_weight: float = 0.0) -> dict:
    """UNet training on cached latents (cache built by rank 0, then read by every rank)."""
    from easel.training.clip import load_text_encoder
    from easel.training.unet import UnetRun, load_or_build_cache, train_unet
    from easel.training.vae import load_vae
    info = info or DistInfo()
    tok = CLIPTokenizer.from_dir(_require(layout.tokenizer, "tokenizer", layout.root))
    vae_cfg = load_vae(_require(layout.vae, "vae", layout.root)).config
    cfg = presets.shapeworld_config(tok.vocab_size, vae_cfg.scale_factor, base)
    text = load_text_encoder(_require(layout.text_encoder, "clip", layout.root), cfg.text_encoders[0])
    cache_path = layout.stage("unet") / "latents.pt"
    cache = lambda: load_or_build_cache(cache_path, layout.vae, layout.tokenizer, n_latents, n_val,  # noqa: E731
                                        base.default_size, langs=LANGS, relation_share=RELATION_SHARE)
    if info.main:
        cache()
    barrier(info)
    data = cache()
    empty = tok([""], max_length=77)[0]
    loop = guard_resume(layout, "unet", loop, info)
    init = init_model(layout).model.unet.state_dict() if layout.init is not None else None
    grounding = None
    if ground_weight:
        from easel.training.grounding import load_or_build_grounding
        grounding = load_or_build_grounding(layout.stage("unet") / "grounding.pt", data, tok, loop.progress and info.main)
    run = UnetRun(layout.stage("unet"), cfg, text, empty, data, loop, init=init, text_lr_scale=text_lr_scale,
                  ground_weight=ground_weight, grounding=grounding)
    metrics = train_unet(run, info)
    if info.main:
        mark_done(layout, "unet", metrics)
    return metrics


# --- assembling the built-in model ---------------------------------------------------------------

def build_model(layout: Layout, base: ModelConfig, unet_variant: str) -> LoadedModel:
    """The trained components as one StableDiffusion with its tokenizer (in memory)."""
    from safetensors.torch import load_file

    from easel.training.vae import load_vae
    tok = CLIPTokenizer.from_dir(_require(layout.tokenizer, "tokenizer", layout.root))
    vae = load_vae(_require(layout.vae, "vae", layout.root))
    cfg = presets.shapeworld_config(tok.vocab_size, vae.config.scale_factor, base)
    if vae.config != cfg.vae:
        raise TrainingError(f"the trained VAE ({vae.config}) is not the preset's ({cfg.vae}): use the same --preset")
    unet_file = _require(layout.stage("unet") / f"unet_{unet_variant}.safetensors", "unet", layout.root)
    text_file = text_encoder_file(layout, unet_variant)
    parts = {"unet": load_file(str(unet_file)), "vae": vae.state_dict(),
             "text_encoder.0": load_file(str(_require(text_file, "clip", layout.root)))}
    model = StableDiffusion.empty(cfg)
    model.load_components(parts, dtype=torch.float32)
    return LoadedModel(model.eval().requires_grad_(False), [tok], str(layout.model), "")


def unet_text_encoder_file(layout: Layout, unet_variant: str) -> Path:
    """The text encoder the UNet learnt from: the one trained with it (`--train-text-encoder`), else CLIP's."""
    joint = layout.stage("unet") / f"text_encoder_{unet_variant}.safetensors"
    return joint if joint.is_file() else layout.text_encoder


def text_encoder_file(layout: Layout, unet_variant: str) -> Path:
    """The text encoder the model ships: the bilingual distillation's, else the one the UNet learnt from."""
    if layout.bilingual_text_encoder.is_file():
        return layout.bilingual_text_encoder
    return unet_text_encoder_file(layout, unet_variant)


def sample_batch(loaded: LoadedModel, prompts: list[str], seed: int = 1000, steps: int = 20,
                 cfg_scale: float = 5.0) -> list:
    """All prompts as one batch (DPM++ 2M Karras, CFG): PIL images, far faster than one request each."""
    from easel.pipelines import common
    from easel.pipelines.plan import sample_plain_batch
    latents = sample_plain_batch(loaded, prompts, "dpmpp_2m", "karras", steps, cfg_scale, seed)
    return common.decode(loaded.model, latents)


def judge_score(loaded: LoadedModel, per_category: int = 8, steps: int = 20, cfg_scale: float = 5.0) -> dict:
    """Benchmark pass rates (core categories) of a model with the analytic ShapeWorld judge."""
    from easel.world.benchmark import CORE_CATEGORIES, evaluate, make_prompts, score
    prompts = make_prompts(seed=7, per_category=per_category, categories=CORE_CATEGORIES)
    images = []
    for i in range(0, len(prompts), 64):
        images += sample_batch(loaded, [p.text for p in prompts[i:i + 64]], 1000 + i, steps, cfg_scale)
    return score(evaluate(images, prompts))


def choose_unet(layout: Layout, base: ModelConfig, use_judge: bool = True) -> tuple[str, dict]:
    """Raw or EMA UNet: by the judge's overall score when available, else by validation loss."""
    metrics = json.loads((layout.stage("unet") / "metrics.json").read_text())
    variants = [v for v in ("raw", "ema") if (layout.stage("unet") / f"unet_{v}.safetensors").exists()]
    report = {f"{v}_val_loss": metrics.get(f"{v}_val_loss") for v in variants}
    if use_judge and len(variants) > 1:
        try:
            scores = {v: judge_score(build_model(layout, base, v)) for v in variants}
        except ImportError as e:  # the judge is optional for assembling
            print(f"[all] judge unavailable ({e}); choosing the UNet by validation loss", file=sys.stderr)
        else:
            report.update({f"{v}_judge": s for v, s in scores.items()})
            best = max(variants, key=lambda v: (scores[v].get("overall", 0), -(metrics.get(f"{v}_val_loss") or 0)))
            return best, report
    return metrics.get("chosen_by_val_loss", variants[0]), report


def vocabulary_metadata() -> dict[str, str]:
    """The model metadata entry listing every word the captions were made of, per language."""
    from easel.world.captions import vocabulary
    return {VOCABULARY_KEY: json.dumps({lang: vocabulary(lang) for lang in LANGS}, ensure_ascii=False)}


def write_tower(layout: Layout, model_path: Path, base: ModelConfig) -> Path | None:
    """The CLIP stage's image tower beside the model (`clip_vision.safetensors`), tagged with the model's hash."""
    from safetensors.torch import load_file

    from easel.training.clip_image_tower import KIND
    from easel.weights.load import write_safetensors
    from easel.weights.load import file_hash
    src = layout.stage("clip") / "clip.safetensors"
    if not src.is_file():
        return None
    vision = presets.VISION_PRESETS["tiny" if base.name == presets.TINY.name else "shapeworld"]
    vision = dataclasses.replace(vision, image_size=base.default_size)
    metrics_file = layout.stage("clip") / "metrics.json"
    meta = {"kind": KIND, "text_model_hash": file_hash(model_path), "vision_config": json.dumps(dataclasses.asdict(vision)),
            "metrics": metrics_file.read_text() if metrics_file.is_file() else "{}"}
    tower = {k: v for k, v in load_file(str(src)).items() if not k.startswith("text.")}
    path = model_path.parent / TOWER_FILE
    write_safetensors(tower, path, metadata=meta)
    return path


def assemble(layout: Layout, base: ModelConfig = presets.SHAPEWORLD, use_judge: bool = True,
             variant: str | None = None) -> Path:
    """Write shapeworld.safetensors (+ shapeworld.tokenizer/, clip_vision.safetensors) from the trained stages, with
    its vocabulary and preview map in the metadata; `variant` ("raw" / "ema") skips the choice; -> its path."""
    from easel.weights.model_io import save_model
    if variant is None:
        variant, report = choose_unet(layout, base, use_judge)
    else:
        report = json.loads((layout.root / "model.json").read_text()) if (layout.root / "model.json").is_file() else {}
        report.pop("unet", None), report.pop("size_mb", None)
    loaded = build_model(layout, base, variant)
    from easel.pipelines.preview import latent_rgb_metadata  # the preview map ships inside the model
    path = save_model(loaded, layout.model, extra_metadata={**vocabulary_metadata(), **latent_rgb_metadata(loaded)})
    if text_encoder_file(layout, variant) == layout.text_encoder:
        write_tower(layout, path, base)
    else:  # CLIP's image tower was trained against another text encoder: it does not pair with this one
        (path.parent / TOWER_FILE).unlink(missing_ok=True)
        print(f"[all] the text encoder trained on after CLIP, so CLIP's image tower does not fit it: fit one with "
              f"`python3 -m easel.training.clip_image_tower --model {path} --out {path.parent / TOWER_FILE}`",
              file=sys.stderr)
    mb = path.stat().st_size / 2**20
    write_json(layout.root / "model.json", {"unet": variant, "size_mb": round(mb, 2), **report})
    if mb > MAX_MODEL_MB:
        print(f"[all] warning: {path} is {mb:.1f} MB, over the {MAX_MODEL_MB} MB budget for the built-in model",
              file=sys.stderr)
    return path


def train_all(layout: Layout, base: ModelConfig, loops: dict[str, LoopConfig], info: DistInfo | None = None,
              redo: tuple[str, ...] = (), n_captions: int = 20000, n_latents: int = 60000,
              use_judge: bool = True, text_lr_scale: float | None = None, ground_weight: float = 0.0) -> Path | None:
    """Run every stage that is not done (or is in `redo`), then assemble the model; -> its path on rank 0."""
    info = info or DistInfo()
    for stage in STAGES:
        if stage not in redo and is_done(layout, stage):
            if info.main:
                print(f"[all] {stage}: done, skipping (pass --redo {stage} to train it again)", file=sys.stderr)
            continue
        if info.main:
            print(f"[all] {stage}: training", file=sys.stderr)
        if stage == "tokenizer":
            stage_tokenizer(layout, n_captions, info)
        elif stage == "clip":
            stage_clip(layout, base, loops["clip"], info)
        elif stage == "vae":
            stage_vae(layout, base, loops["vae"], info)
        else:
            stage_unet(layout, base, loops["unet"], info, n_latents, text_lr_scale=text_lr_scale,
                       ground_weight=ground_weight)
        barrier(info)
    return assemble(layout, base, use_judge) if info.main else None
