"""Extra networks a request names: `<lora:name:weight>` prompt tags and `loras` entries, applied around a run.

As A1111: a tag's weights are `<lora:name:te:unet>` (one number sets both; `te=`/`unet=` name them), the
tags are taken out of the prompt before it is encoded (easel.pipelines.conditioning), and a LoRA is looked
up by file name in the LoRA folders (easel.weights.lora.find_lora) or given as a path. The weights are merged
into every model the request uses (the refiner too) before sampling and restored bit for bit afterwards.
Nothing is dropped silently: keys that fit no layer, tags of other kinds (`<hypernet:...>`) and tags that
only A1111's hires-prompt machinery would read are logged and recorded in the image parameters.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from easel.text.prompt import LORA_KINDS, ExtraNetwork, extract_extra_networks, lora_weights
from easel.weights.lora import LoraError, LoraFile, LoraPatch, apply_loras, find_lora, read_lora

log = logging.getLogger("easel")
_HASHES: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime) -> sha256 hex


@dataclass
class LoraUse:
    """One LoRA a request asks for: the name it was given by, its file and its two weights."""

    name: str
    path: Path
    te: float
    unet: float


@dataclass
class NetworkRequest:
    """Everything about extra networks in a request: the LoRAs to apply and the tags that are not applied."""

    loras: list[LoraUse] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)  # tags of kinds easel does not have (<hypernet:...>)
    ignored: list[str] = field(default_factory=list)  # LoRA tags where easel does not read them (negative prompt)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'name_or_path:weight' -> (name_or_path, weight); without a number after the last ':', weight 1."""
    head, sep, tail = spec.strip().rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass  # a path with a colon in it ("C:\\loras\\x.safetensors"), no weight
    return spec.strip(), 1.0


def tag_text(net: ExtraNetwork) -> str:
    """The tag as written: <kind:name:args>."""
    return "<" + ":".join([net.kind, net.name, *net.args]) + ">"


def requested_networks(req) -> NetworkRequest:
    """The extra networks of a request, each LoRA found on disk (LoraNotFound, listing what exists, if not)."""
    out = NetworkRequest()
    _, tags = extract_extra_networks(req.prompt)
    for net in tags:
        if net.kind in LORA_KINDS:
            te, unet = lora_weights(net)
            out.loras.append(LoraUse(net.name, find_lora(net.name), te, unet))
        else:
            out.unsupported.append(tag_text(net))
    for spec in req.loras:
        name, weight = parse_lora_spec(spec)
        path = find_lora(name)
        out.loras.append(LoraUse(path.stem if Path(name).suffix else name, path, weight, weight))
    applied = {tag_text(n) for n in tags}
    for where in ("negative_prompt", "hr_prompt", "hr_negative_prompt"):
        for net in extract_extra_networks(getattr(req, where) or "")[1]:
            if tag_text(net) not in applied:  # the hires prompt repeating the prompt's tags is fine
                out.ignored.append(f"{tag_text(net)} ({where.replace('_', ' ')})")
    return out


def lora_hash(path: str | Path, lora: LoraFile | None = None) -> str:
    """A1111's LoRA hash (sha256 hex): the file's `sshs_model_hash` metadata if any, else for `.safetensors` the
    sha256 of the tensor data after the header (the "addnet" hash), else of the whole file."""
    path = Path(path).resolve()
    if lora is not None and lora.metadata.get("sshs_model_hash"):
        return lora.metadata["sshs_model_hash"]
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                header = int.from_bytes(f.read(8), "little")  # u64 header length, then the JSON header
                f.seek(8 + header)
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


class ActiveNetworks:
    """The extra networks of one request, found on disk when made (so that a missing LoRA fails before any
    work); `applied(models)` merges the LoRAs into the models for the duration of a `with` block.

    The first model is the one the request is for: a LoRA that does not fit it is an error. Later models
    (a refiner) get what fits them; a LoRA made for another architecture is reported and skipped there.
    """

    def __init__(self, req):
        self.request = requested_networks(req)
        self.files: list[LoraFile] = []
        self.unmatched: dict[str, int] = {}
        self.skipped: list[str] = []

    @contextlib.contextmanager
    def applied(self, models: list):
        """Merge the LoRAs into every model, run the block, then restore the weights bit for bit."""
        self._warn_unused()
        uses = self.request.loras
        if uses and not self.files:
            self.files = [read_lora(u.path) for u in uses]
        patches: list[LoraPatch] = []
        try:
            for i, loaded in enumerate(models if uses else []):
                patch = self._apply(i, loaded, uses)
                if patch is not None:
                    patches.append(patch)
            yield self
        finally:
            while patches:  # the reverse order of applying
                patches.pop().unload()

    def _apply(self, index: int, loaded, uses: list[LoraUse]) -> LoraPatch | None:
        pairs, te = [(f, u.unet) for f, u in zip(self.files, uses)], [u.te for u in uses]
        try:
            patch = apply_loras(loaded.model, pairs, te_weights=te)
        except LoraError as e:
            if index == 0:
                raise
            name = getattr(loaded, "name", "the refiner")
            self.skipped.append(f"{name}: {e}")
            log.warning("LoRA not applied to %s: %s", name, e)
            return None
        missing = set(patch.unmatched)
        for f, u in zip(self.files, uses):
            keys = {k for layer in f.layers.values() for k in layer.keys} | set(f.unsupported)
            n = len(keys & missing)
            if n and index == 0:  # lora.apply_loras has logged them; the parameters record how many
                self.unmatched[u.name] = self.unmatched.get(u.name, 0) + n
        return patch

    def _warn_unused(self) -> None:
        for tag in self.request.unsupported:
            log.warning("extra network %s not applied: easel applies LoRA (<lora:...>, <lyco:...>) only", tag)
        for tag in self.request.ignored:
            log.warning("extra network %s not applied: LoRA tags are read from the prompt only", tag)

    def params(self) -> dict:
        """Image parameters: A1111's 'Lora hashes' {name: first 12 hex} and whatever was not applied."""
        p: dict = {}
        if self.files:
            names = {u.name.translate(str.maketrans("", "", ":,")): lora_hash(u.path, f)[:12]
                     for u, f in zip(self.request.loras, self.files)}
            p["lora_hashes"] = names
        if self.unmatched:
            p["lora_unmatched_keys"] = dict(self.unmatched)
        if self.skipped:
            p["lora_skipped"] = list(self.skipped)
        if self.request.unsupported:
            p["extra_networks_unsupported"] = list(self.request.unsupported)
        if self.request.ignored:
            p["extra_networks_ignored"] = list(self.request.ignored)
        return p
