"""See inside a server job: the capture (easel.inspect) of a job submitted with `"inspect": true`, drawn once when
the job finishes into small PNGs and tables that `GET /api/v1/jobs/{id}/inside` and the web UI's Inside tab show.

    capture = JobCapture()
    results = pipe.generate(req, extend_plan=capture)
    inside = draw_inside(capture, results, req)      # Inside: JSON-able data + PNG bytes by name
    inside.to_dict("/api/v1/jobs/ID/inside/")

Memory stays bounded whatever the request: only the first image of the first batch is kept, at most MAX_FRAMES
steps per sampling pass (the schedule keeps every sigma), cross-attention is summed as it runs (no per-step maps),
and the queue keeps the drawings of the last few inspected jobs only (JobQueue.keep_inside).
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from easel.inspect.capture import Capture, Run
from easel.inspect.steps import pick_steps

MAX_FRAMES = 24  # steps of the film strip kept per sampling pass (evenly spread, first and last always)
SIDE = 256  # pixels: the longest side of every picture of the capture
MAP_SIDE = 128  # attention maps over images smaller than this are drawn on the image enlarged by whole pixels
STEP_KINDS = ("x0", "latent", "noise")  # the pictures of one step, in the film strip's order


class JobCapture:
    """An `extend_plan` function for one job: a Capture of steps and cross-attention (no CFG parts, no per-step
    attention maps) that keeps the first image of the first batch only, at most MAX_FRAMES steps per pass, and
    each pass's schedule (its sigmas)."""

    def __init__(self):
        self.capture = Capture(cfg=False, per_step=False)
        self.loaded = None
        self.passes: list[tuple[Run, list[float]]] = []  # (run, sigmas) of every pass of the first batch

    def __call__(self, plan, loaded):
        """Extend one plan: the capture's hooks, then an observer that trims what the capture keeps."""
        self.loaded = loaded
        plan = self.capture(plan, loaded)
        run = self.capture.runs[-1]
        self.passes.append((run, [float(s) for s in plan.sigmas]))
        keep = set(pick_steps(plan.steps, MAX_FRAMES))
        return plan.observe(lambda d: self._trim(run, d, keep))

    def close(self) -> None:
        """Remove the capture's hooks (the model is as it was)."""
        self.capture.close()

    def _trim(self, run: Run, d: dict, keep: set[int]) -> None:
        """After the capture's own observer: drop a later batch's run, and of the first batch keep image 0 of the
        chosen steps (copies: a view would hold the whole batch's tensor)."""
        if d.get("batch", 0) != 0:
            self.passes = [(r, s) for r, s in self.passes if r is not run]
            self.capture.runs = [r for r in self.capture.runs if r is not run]
            run.steps.clear()
            run.attention.clear()  # the hooks still add this step's maps: at most one step's stay
            return
        if not run.steps or run.steps[-1].i != int(d["i"]):
            return
        rec = run.steps[-1]
        if rec.i not in keep:
            run.steps.pop()
            return
        rec.x, rec.x0 = rec.x[:1].clone(), rec.x0[:1].clone()


@dataclass
class Inside:
    """A job's capture, drawn: `data` (JSON-able, pictures named by key) and `files` (name -> PNG bytes);
    `maps` (position -> (h, w) float32) are the raw token maps at the latent's resolution."""

    data: dict
    files: dict[str, bytes] = field(default_factory=dict)
    maps: dict[int, np.ndarray] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes held (PNGs and raw maps)."""
        return sum(len(b) for b in self.files.values()) + sum(m.nbytes for m in self.maps.values())

    def to_dict(self, base: str, raw: bool = False, embed: bool = False) -> dict:
        """The capture as the API returns it: pictures as URLs under `base` (or data: URLs with `embed`), and
        with `raw` each token map's values (rows of floats at the latent's resolution)."""
        def url(name: str) -> str:
            if embed:
                return "data:image/png;base64," + base64.b64encode(self.files[name]).decode("ascii")
            return f"{base}{name}.png"

        out = {k: v for k, v in self.data.items() if k not in ("passes", "attention")}
        out["passes"] = [{**p, "steps": [{**s, **{k: url(s[k]) for k in STEP_KINDS}} for s in p["steps"]]}
                         for p in self.data["passes"]]
        attn = self.data.get("attention")
        if attn is not None:
            tokens = []
            for t in attn["tokens"]:
                t = {**t, "map": url(t["map"])}
                if raw:
                    t["values"] = [[float(v) for v in row] for row in self.maps[t["position"]]]
                tokens.append(t)
            attn = {**attn, "tokens": tokens, "words": [{**w, "map": url(w["map"])} for w in attn["words"]]}
        out["attention"] = attn
        return out


def draw_inside(cap: JobCapture, results: list, req) -> Inside:
    """Draw a finished job's capture: the film strip of each pass, the schedule, the token table of the prompt
    and one attention map per token and per word over the job's first image."""
    from easel.inspect.run import first_text, texts_by_weight
    if not results:
        raise ValueError("the job made no image to look inside (cancelled before its first batch finished)")
    image = results[0].image
    loaded = cap.loaded
    texts = texts_by_weight(cap.capture)
    text = texts[0] if texts else first_text(req.prompt, req.steps)
    inside = Inside({"text": text, "width": image.width, "height": image.height, "passes": [],
                     "frames_max": MAX_FRAMES})
    inside.data["passes"] = [_draw_pass(inside, loaded, run, sigmas, n, image.width)
                             for n, (run, sigmas) in enumerate(cap.passes)]
    inside.data["tokens"] = _token_rows(loaded, text, req.clip_skip)
    inside.data["slots_per_chunk"] = min(e.max_position_embeddings for e in loaded.model.config.text_encoders)
    inside.data["attention"] = _draw_attention(inside, cap, text, image) if texts else None
    return inside


def _side(width: int) -> int:
    """The width of a step picture for an image `width` pixels wide (small ones are scaled up by the page)."""
    return min(SIDE, width)


def _draw_pass(inside: Inside, loaded, run: Run, sigmas: list[float], n: int, width: int) -> dict:
    """One sampling pass: its schedule and, per kept step, the decoded x0, the latent preview and the noise."""
    from easel.inspect.steps import StepPictures
    pics = StepPictures(loaded, _side(width))
    steps = []
    for rec in run.steps:
        pictures = {"x0": pics.decode(rec.x0[0]), "latent": pics.preview(rec.unit_x[0]),
                    "noise": pics.mosaic(rec.noise[0])}
        names = {}
        for kind, im in pictures.items():
            names[kind] = f"pass{n}-step{rec.i}-{kind}"
            inside.files[names[kind]] = _png(im)
        steps.append({"i": rec.i, "sigma": rec.sigma, "sigma_next": rec.sigma_next, **names})
    return {"phase": run.tags.get("phase"), "latent_size": list(run.latent_size or ()), "sigmas": sigmas,
            "total_steps": len(sigmas) - 1, "steps": steps}


def _token_rows(loaded, text: str, clip_skip: int) -> list[dict]:
    """The token table of `easel inspect tokens --json` for the text the encoder read."""
    from easel.inspect.tokens import token_table
    from easel.pipelines.common import embedding_library
    return token_table(loaded, text, clip_skip, embedding_library(loaded))


def _draw_attention(inside: Inside, cap: JobCapture, text: str, image: Image.Image) -> dict:
    """Per token (start, the prompt's pieces, end) and per word: the map over the image, and the raw map."""
    from easel.inspect import draw
    from easel.inspect.attention import capture_maps, slot_labels, word_maps
    from easel.inspect.tokens import prompt_slots
    from easel.pipelines.common import embedding_library
    maps = capture_maps(cap.capture, text)[0].float().numpy()  # (S, h, w) of the first image
    labels = slot_labels(prompt_slots(cap.loaded, text, embedding_library(cap.loaded)), maps.shape[0])
    big = _fit(image)
    tokens = []
    for s in labels:
        if s.kind == "pad":
            continue
        name = f"token-{s.position}"
        inside.files[name] = _png(draw.overlay(big, draw.normalise(maps[s.position])))
        inside.maps[s.position] = maps[s.position].astype(np.float32)
        tokens.append({"position": s.position, "chunk": s.chunk, "piece": s.piece, "kind": s.kind, "word": s.word,
                       "word_text": s.word_text, "weight": s.weight, "key": s.key,
                       "mass": float(maps[s.position].mean()), "map": name})
    words = []
    for n, (word, m, pieces) in enumerate(word_maps(maps, labels)):
        name = f"word-{n}"
        inside.files[name] = _png(draw.overlay(big, draw.normalise(m)))
        words.append({"word": word, "positions": [p.position for p in pieces], "map": name})
    return {"size": list(maps.shape[1:]), "tokens": tokens, "words": words}


def _fit(image: Image.Image) -> Image.Image:
    """The image at the size the maps are drawn: small images enlarged by whole pixels, large ones shrunk."""
    from easel.inspect import draw
    big = draw.enlarge(image, MAP_SIDE)
    if max(big.size) > SIDE:
        scale = SIDE / max(big.size)
        big = big.resize((max(1, round(big.width * scale)), max(1, round(big.height * scale))), Image.LANCZOS)
    return big


def _png(image: Image.Image) -> bytes:
    """PNG bytes of a picture."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)  # fast: drawn while the job counts as running
    return buf.getvalue()


def capture_bytes(config, req) -> int:
    """An upper bound of the memory a JobCapture holds for a resolved request (width, height and batch set) on a
    model of `config`: the kept frames (x and x0 of one image), a batch's attention sums for two runs (the one
    being dropped and the next), the full-batch copies of one step, and the attention kernel's score groups."""
    from easel.inspect.capture import SCORE_BYTES
    from easel.pipelines.memory import pass_sizes
    f, channels = config.vae.downsample, config.unet.out_channels
    batch = req.batch_size or config.default_batch
    chunks = 1 + max(len(req.prompt or ""), len(req.negative_prompt or "")) // 75  # a token has >= 1 character
    context = 77 * chunks
    total = SCORE_BYTES
    for w, h in pass_sizes(req):
        cells = -(-h // f) * -(-w // f)
        total += 4 * cells * channels * (2 * MAX_FRAMES + 2 * batch)  # kept frames + one step's batch copies
        total += 2 * 4 * batch * (cells * 4 // 3) * context  # attention sums over every level, two runs alive
    return total
