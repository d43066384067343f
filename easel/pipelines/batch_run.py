"""`easel batch FILE`: many requests from one file; compatible lines share one model batch; resumable; sharded
over processes (torchrun) by line.

The file: one request per line. A line starting with `{` is a JSON object of request fields (GenerationRequest's
names, the ones `easel generate`'s flags set: {"prompt": "a red star", "steps": 8, "seed": 3}); any other line is a
prompt; blank lines and lines starting with `#` are skipped. The command's flags are defaults for every line.

Everything that decides an image is fixed by the file alone, so the same file gives the same images whatever the
number of processes and however often a run is killed and restarted:
- seeds: a line's "seed", else `--seed` + the number of images on the lines before it;
- groups: consecutive compatible lines (same size, steps, sampler, schedule) are joined into one model batch of at
  most `max_batch` images, before any sharding; rank r of W runs groups r, r + W, ...;
- names: `<line>-<image>-<seed>.png`, so sorting the folder puts the images in file order (the merge).
A group whose images all exist is skipped; a group with some missing is remade whole (same batch, same numbers)
and only the missing images are written (atomically: a killed run never leaves half a PNG).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from easel.pipelines.request import GenerationRequest

FIELDS = {f.name: f for f in dataclasses.fields(GenerationRequest)}
_SCALAR_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
MAX_ERRORS_SHOWN = 10


class BatchFileError(ValueError):
    """Bad lines in a batch file: every one named with its line number and the fix."""

    def __init__(self, path: str | os.PathLike, errors: list[str]):
        self.errors = errors
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN])
        more = f"; and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        super().__init__(f"{path}: {len(errors)} bad line(s), nothing was generated: {shown}{more}")


@dataclass
class BatchLine:
    """One line of the file as a request whose seed, batch size and number of batches are fixed."""

    number: int  # 1-based line number in the file
    request: GenerationRequest

    @property
    def count(self) -> int:
        """Images this line makes."""
        return self.request.batch_size * self.request.n_iter

    @property
    def seeds(self) -> list[int]:
        """The line's seeds, counting up from its seed across its batches (as A1111 and `easel generate`)."""
        return [self.request.seed + i for i in range(self.count)]

    def paths(self, out: Path) -> list[Path]:
        """Where its images go: <line>-<image>-<seed>.png (sorting the names gives file order)."""
        return [out / f"{self.number:05d}-{i:02d}-{seed}.png" for i, seed in enumerate(self.seeds)]


# --- reading the file -------------------------------------------------------------------------------------------
def read_batch_file(path: str | os.PathLike, defaults: dict | None = None, base_seed: int = 0) -> list[BatchLine]:
    """The file's requests (defaults under each line's own fields), every line checked; BatchFileError lists
    every bad line at once."""
    text = _read_text(Path(path))
    lines, errors, offset = [], [], 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            req = parse_line(stripped, defaults or {})
        except (ValueError, TypeError) as e:
            errors.append(f"line {number}: {e}")
            continue
        if req.seed is None or req.seed < 0:  # fixed per line: a resumed or sharded run draws the same
            req.seed = base_seed + offset
        if req.subseed is None or req.subseed < 0:
            req.subseed = req.seed
        line = BatchLine(number, req)
        lines.append(line)
        offset += line.count
    if errors:
        raise BatchFileError(path, errors)
    if not lines:
        raise ValueError(f"{path} holds no requests: write one prompt (or one JSON object) per line")
    return lines


def _read_text(path: Path) -> str:
    """The file as text; errors say what is wrong with it."""
    if not path.is_file():
        raise FileNotFoundError(f"batch file not found: {path}" if not path.is_dir() else
                                f"{path} is a folder; give a text file with one prompt or JSON object per line")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def parse_line(text: str, defaults: dict) -> GenerationRequest:
    """One line (a prompt, or a JSON object of request fields) over `defaults` -> a checked request (one image
    per line unless it says batch_size / n_iter)."""
    fields = {"batch_size": 1, **defaults}
    if text.startswith("{"):
        fields.update(_json_fields(text))
    else:
        fields["prompt"] = text
    req = GenerationRequest.from_dict(fields)
    req.check()
    return req


def _json_fields(text: str) -> dict:
    """The request fields of a JSON line, with unknown names and wrong types named."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno}); a JSON line is one object such as "
                         '{"prompt": "a red star", "steps": 8}') from None
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON line must be an object of request fields, not a {type(obj).__name__}")
    for name, value in obj.items():
        _check_field(name, value)
    return obj


def _check_field(name: str, value) -> None:
    """Raise naming the field when it is unknown (with the nearest name) or of the wrong JSON type."""
    if name == "model":
        raise ValueError("'model' cannot change per line: every line runs on the model of --model (run one "
                         "batch file per model)")
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "the fields are GenerationRequest's (`easel generate` " \
                                                            "flag names with _ for -, e.g. cfg_scale)"
        raise ValueError(f"unknown request field {name!r}; {hint}")
    kind = str(FIELDS[name].type).split("|")[0].strip()
    allowed = _SCALAR_TYPES.get(kind)
    optional = "None" in str(FIELDS[name].type)
    if allowed is None or (value is None and optional):
        return
    if not isinstance(value, allowed) or (kind != "bool" and isinstance(value, bool)):
        wanted = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "true or false"}[kind]
        raise ValueError(f"{name} must be {wanted} (got {json.dumps(value)})")


# --- grouping and sharding ---------------------------------------------------------------------------------------
def joint_key(req: GenerationRequest) -> tuple | None:
    """What lines must share to sample in one model batch (None: the line runs alone: an edit, hires fix,
    refiner, LoRA, ControlNet, styles, wildcards, variation seed, previews or several batches: Pipeline.generate
    handles those)."""
    from easel.pipelines.names import sampler_and_schedule
    from easel.text.prompt import extract_extra_networks
    if (req.mode != "txt2img" or req.enable_hr or req.refiner_checkpoint or req.loras or req.n_iter != 1
            or getattr(req, "controlnets", None) or getattr(req, "styles", None) or _dynamic(req)
            or req.subseed_strength > 0 or req.seed_resize_from_w or req.seed_resize_from_h or req.preview_every
            or extract_extra_networks(req.prompt)[1] or extract_extra_networks(req.negative_prompt)[1]):
        return None
    sampler, scheduler = sampler_and_schedule(req.sampler, req.scheduler)
    # the size as written (None: the model's): groups depend on the file alone, known before the model loads
    # The accelerations change how the whole batch samples: lines share a batch only with the same settings.
    accel = (req.deepcache, req.tome, req.cfg_cutoff)
    return req.width, req.height, req.steps, sampler, scheduler, req.eta, req.tiled_vae, accel


def _dynamic(req: GenerationRequest) -> bool:
    """Whether the prompts hold wildcards or {a|b} choices (drawn per image by Pipeline.generate; a style or a
    wildcard may also bring a LoRA tag): such lines run alone."""
    from easel.text.wildcards import has_dynamic_syntax
    return any(has_dynamic_syntax(t) for t in (req.prompt, req.negative_prompt))


def make_groups(lines: list[BatchLine], max_batch: int) -> list[list[BatchLine]]:
    """Consecutive lines with the same joint key, up to `max_batch` images a group; the rest one line a group."""
    if max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1 (got {max_batch})")
    groups: list[list[BatchLine]] = []
    last_key = None
    for line in lines:
        key = joint_key(line.request)
        group = groups[-1] if groups else []
        if (key is not None and key == last_key and
                sum(x.count for x in group) + line.count <= max_batch):
            group.append(line)
        else:
            groups.append([line])
        last_key = key
    return groups


def shard() -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK / WORLD_SIZE (1 process without them), checked."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError("RANK and WORLD_SIZE must be integers (torchrun sets them; unset them for one "
                         "process)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK must be in 0..WORLD_SIZE-1 (got RANK={rank}, WORLD_SIZE={world})")
    return rank, world


# --- running ---------------------------------------------------------------------------------------------------
def pending_groups(lines: list[BatchLine], out: str | os.PathLike, max_batch: int = 4, rank: int = 0,
                   world: int = 1) -> tuple[list[list[BatchLine]], int]:
    """(this process's groups with an image still missing, images already there): rank r of `world` takes
    groups r, r + world, ...; known before the model loads."""
    todo, skipped = [], 0
    for group in make_groups(lines, max_batch)[rank::world]:
        missing = sum(not p.exists() for line in group for p in line.paths(Path(out)))
        skipped += sum(line.count for line in group) - missing
        if missing:
            todo.append(group)
    return todo, skipped


def run_batch(pipe, groups: list[list[BatchLine]], out: str | os.PathLike,
              on_image: Callable[[Path], None] | None = None, progress: bool = True,
              desc: str = "batch") -> list[Path]:
    """Make the groups' images in `out` (see pending_groups), a progress bar over their steps; returns the PNGs
    written, `on_image(path)` told of each as soon as it is written."""
    from tqdm import tqdm
    written: list[Path] = []
    total = sum(_group_steps(g) for g in groups)
    with tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False, disable=not progress,
              desc=desc) as bar:
        for group in groups:
            for path in run_group(pipe, group, Path(out), callback=lambda d: bar.update(1)):
                written.append(path)
                bar.set_postfix(images=len(written), refresh=False)
                if on_image is not None:
                    on_image(path)
    return written


def _group_steps(group: list[BatchLine]) -> int:
    """Sampler steps a group runs (a joint group steps once for all its lines)."""
    from easel.pipelines.plan import count_steps
    return count_steps(group[0].request)  # the lines of a joint group share their steps and run one batch


def run_group(pipe, group: list[BatchLine], out: Path, callback=None) -> list[Path]:
    """Make one group's images and write the missing ones; returns the paths written."""
    from easel.pipelines.metadata import save_png
    if len(group) == 1 and joint_key(group[0].request) is None:
        made = [pipe.generate(dataclasses.replace(group[0].request), callback)]
    else:
        made = joint_generate(pipe, group, callback)
    written = []
    for line, images in zip(group, made):
        for path, image in zip(line.paths(out), images):
            if not path.exists():
                written.append(save_png(image.image, path, image.params))
    return written


@torch.no_grad()
def joint_generate(pipe, group: list[BatchLine], callback=None) -> list[list]:
    """The lines' txt2img images sampled as one batch (each line keeps its own prompts, guidance scale, clip skip
    and seeds): a list of GeneratedImage per line."""
    from easel.pipelines import common, plan
    from easel.pipelines.pipeline import prompt_report
    from easel.pipelines.txt2img import GeneratedImage, image_params
    from easel.samplers import NoiseSource
    loaded, cfg = pipe.loaded, pipe.config
    reqs = []
    for line in group:
        req = dataclasses.replace(line.request, dtype=pipe.dtype, device=pipe.device)
        reqs.append(req.resolved(cfg.default_size, cfg.default_batch))
    sigmas = plan.request_sigmas(loaded.model, reqs[0])
    plans = [plan.build_plan(loaded, r, line.seeds, sigmas) for r, line in zip(reqs, group)]
    joint = JointDenoiser([p.denoiser for p in plans], [line.count for line in group])
    noise = torch.cat([p.noise for p in plans])
    source = NoiseSource([g for p in plans for g in p.noise_source.generators])
    latents = plan.run(plan.SamplingPlan(reqs[0].sampler, sigmas, noise, source, joint, eta=reqs[0].eta), callback)
    images = iter(common.decode(loaded.model, latents, reqs[0].tiled_vae))
    result = []
    for req, line in zip(reqs, group):
        ti_hashes, warnings = prompt_report(loaded, req)
        made = []
        for seed in line.seeds:
            params = image_params(loaded, req, seed)
            if ti_hashes:
                params["ti_hashes"] = ti_hashes
            made.append(GeneratedImage(next(images), params, warnings))
        result.append(made)
    return result


class JointDenoiser:
    """Several lines' guided denoisers (GuidedDenoiser: own prompts, AND parts, prompt schedule, guidance scale)
    over one batch x split by `sizes`: their model inputs go into one model call wherever their text contexts
    have the same length, and each line's guidance is applied to its own rows as GuidedDenoiser does."""

    def __init__(self, parts: list, sizes: list[int]):
        if len(parts) != len(sizes):
            raise ValueError("JointDenoiser needs one size per denoiser")
        self.parts, self.sizes = parts, sizes
        self.inner = parts[0].inner  # the model wrapper: the same model for every line

    def __call__(self, x: torch.Tensor, sigma, **extra) -> torch.Tensor:
        """Guided x0 of every line's rows of x (B, ...) at noise level sigma."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.float()
        calls = [g.model_call(xs, ss) for g, xs, ss in zip(self.parts, x.split(self.sizes), sigma.split(self.sizes))]
        outputs = self._stacked_calls(calls, extra)
        return torch.cat([finish(o) for (_, _, _, finish), o in zip(calls, outputs)])

    def _stacked_calls(self, calls: list[tuple], extra: dict) -> list[torch.Tensor]:
        """The model's output for each call's inputs, calls of the same context length stacked into one."""
        buckets: dict[tuple, list[int]] = {}
        for i, (_, _, cond, _) in enumerate(calls):
            key = tuple(sorted((k, tuple(v.shape[1:])) for k, v in cond.items()))
            buckets.setdefault(key, []).append(i)
        outputs: list[torch.Tensor | None] = [None] * len(calls)
        for members in buckets.values():
            xs = torch.cat([calls[i][0] for i in members])
            sigmas = torch.cat([calls[i][1] for i in members])
            cond = {k: torch.cat([calls[i][2][k] for i in members]) for k in calls[members[0]][2]}
            out = self.inner(xs, sigmas, **cond, **extra)
            for i, o in zip(members, out.split([len(calls[i][0]) for i in members])):
                outputs[i] = o
        return outputs


