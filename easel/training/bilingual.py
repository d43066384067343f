"""Teach a trained model's text encoder a second language by distillation through its own UNet.

The UNet learnt to draw from the text encoder's English states. For the same scene's English and Chinese
captions (one seed, one meaning) the frozen UNet's noise prediction from the Chinese caption is pulled onto its
prediction from the English caption under the original encoder, at the same noised latent; only the text encoder
learns, and its English states are held where they were (MSE to the original encoder's). Direct supervision of
what the UNet reads, which the UNet's own loss gives a new language only slowly.

    python3 -m easel.training.bilingual --out runs/shapeworld-v2 --minutes 6   # then re-assembles the model
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from easel.models.clip import CLIPTextModel
from easel.models.configs import ModelConfig
from easel.models.unet import UNetModel
from easel.text.tokenizer import CLIPTokenizer
from easel.training.common import DistInfo, LoopConfig, Trainer, step_generator, write_json
from easel.world.captions import caption
from easel.world.dataset import mixed_scene


@dataclass
class DistillRun:
    """What `distill_language` needs: the model's parts, the latent cache, and the loop settings."""

    out: Path
    model: ModelConfig
    text_encoder: CLIPTextModel  # trained (a copy keeps the original as the teacher)
    unet: UNetModel  # frozen
    tokenizer: CLIPTokenizer
    latents: Tensor  # (N, C, h, w): the cache's training latents; index i is training seed i
    relation_share: float = 0.4  # how the cache drew its scenes (so seed i's scene is the latent's)
    lang: str = "zh"
    keep_weight: float = 1.0  # weight of the MSE holding the English states
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(batch_size=32, lr=2e-4, warmup=20, ema_decay=None))


class TextStudent(torch.nn.Module):
    """The trainable text encoder (a module of its own, so the Trainer sees exactly its parameters)."""

    def __init__(self, text: CLIPTextModel):
        super().__init__()
        self.text = text


def twin_captions(run: DistillRun, idx: Tensor) -> tuple[list[str], list[str]]:
    """English and `run.lang` captions of the training seeds `idx`: the same scene, sizes and relation."""
    scenes = [(int(i), mixed_scene(int(i), run.relation_share)) for i in idx]
    return [caption(sc, i, "en") for i, sc in scenes], [caption(sc, i, run.lang) for i, sc in scenes]


def distill_step(run: DistillRun, student: TextStudent, teacher: CLIPTextModel, denoiser, step: int,
                 info: DistInfo) -> tuple[Tensor, dict]:
    """Loss of one batch: MSE(eps(x_t | new-language caption), eps(x_t | English caption, original encoder))
    + keep_weight * MSE(new English states, original English states)."""
    B, cfg = run.loop.batch_size, run.model
    gen = step_generator(run.loop.seed, step)
    idx = torch.randint(0, len(run.latents), (B,), generator=gen)
    t = torch.randint(0, denoiser.schedule.num_timesteps, (B,), generator=gen)
    noise = torch.randn(B, *run.latents.shape[1:], generator=gen)
    en, other = twin_captions(run, idx)
    ids_en, ids_other = run.tokenizer(en, max_length=77).to(info.device), run.tokenizer(other, max_length=77).to(info.device)
    sigma = denoiser.schedule.sigmas[t].to(info.device)
    x = run.latents[idx].float().to(info.device) + noise.to(info.device) * sigma.view(-1, 1, 1, 1)

    def encode(model: CLIPTextModel, ids: Tensor) -> Tensor:
        return model(ids, clip_skip=cfg.clip_skip, final_norm=cfg.text_final_norm)[0]

    def eps(context: Tensor) -> Tensor:
        return (x - denoiser(x, sigma, context=context)) / sigma.view(-1, 1, 1, 1)

    with torch.no_grad():
        teacher_en = encode(teacher, ids_en)
        target = eps(teacher_en)
    pred = eps(encode(student.text, ids_other))
    keep = F.mse_loss(encode(student.text, ids_en), teacher_en)
    match = F.mse_loss(pred, target)
    return match + run.keep_weight * keep, {"match": round(float(match.detach()), 5), "keep": round(float(keep.detach()), 6)}


def distill_language(run: DistillRun, info: DistInfo | None = None) -> dict:
    """Train the text encoder; save text_encoder.safetensors in run.out; -> metrics."""
    from easel.training.unet import make_denoiser
    info = info or DistInfo()
    teacher = copy.deepcopy(run.text_encoder).to(info.device).eval().requires_grad_(False)
    student = TextStudent(run.text_encoder.to(info.device).train().requires_grad_(True))
    run.unet.to(info.device).eval().requires_grad_(False)
    denoiser = make_denoiser(run.unet, run.model)
    trainer = Trainer("bilingual", run.out, student, run.loop, info)
    trainer.run(lambda step: distill_step(run, student, teacher, denoiser, step, info))
    weights = {k.removeprefix("text."): v.detach().float().cpu().contiguous()
               for k, v in trainer.final_weights(False).items()}
    save_file(weights, str(run.out / "text_encoder.safetensors"))
    last = trainer.log.records()[-1] if trainer.log is not None and trainer.log.records() else {}
    metrics = {"steps": trainer.step, "match": last.get("match"), "keep": last.get("keep")}
    write_json(run.out / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Distil the run's assembled model into a bilingual text encoder, then re-assemble the model with it."""
    from easel.training import all as stages
    from easel.training.common import load_checkpoint
    from easel.weights.model_io import load_model
    p = argparse.ArgumentParser(prog="python3 -m easel.training.bilingual", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/shapeworld", help="the `easel train all` run folder")
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preset", default="shapeworld", choices=["shapeworld", "tiny"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layout = stages.Layout(Path(args.out))
    loaded = load_model(layout.model)
    cache = load_checkpoint(layout.stage("unet") / "latents.pt")
    loop = LoopConfig(steps=args.steps or 1, minutes=None if args.steps else args.minutes, batch_size=32, lr=args.lr,
                      warmup=20, ema_decay=None, ckpt_every=100, progress=False)
    from easel.training.clip import load_text_encoder
    variant = json.loads((layout.root / "model.json").read_text())["unet"]
    text = load_text_encoder(stages.unet_text_encoder_file(layout, variant), loaded.model.config.text_encoders[0])
    run = DistillRun(layout.stage("bilingual"), loaded.model.config, text,
                     loaded.model.unet.float(), loaded.tokenizers[0], cache["train"]["latents"],
                     cache["key"].get("relation_share", 0.0), loop=loop)
    metrics = distill_language(run)
    print(f"[bilingual] {metrics}", file=sys.stderr)
    print(stages.assemble(layout, stages.presets.MODEL_PRESETS[args.preset], variant=variant))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
