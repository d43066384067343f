"""easel's captured cross-attention equals DAAM's (daam 0.2.0, hooked on diffusers' pipeline) on the same random
weights, prompt, noise and schedule, once DAAM's own aggregation is applied to easel's sums.

scripts/daam_parity.py runs both and says what DAAM aggregates (read from its trace.py/heatmap.py); it prints
the numbers. Skipped where daam is not installed:
    pip install matplotlib spacy && pip install --no-deps daam==0.2.0
(daam's requirements pin diffusers 0.21 and transformers 4.30; its code runs as is with the pinned versions here).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

INSTALL = "pip install matplotlib spacy && pip install --no-deps daam==0.2.0"


def _script():
    """scripts/daam_parity.py as a module (scripts/ is no package; dataclasses need it in sys.modules)."""
    if "daam_parity" not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "scripts" / "daam_parity.py"
        spec = importlib.util.spec_from_file_location("daam_parity", path)
        sys.modules["daam_parity"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["daam_parity"]


@pytest.fixture(scope="module")
def parity(tmp_path_factory, one_thread_module):
    """One DAAM-traced diffusers run and one captured easel run of the same tiny SD1-layout model."""
    try:
        import daam  # noqa: F401
    except ImportError as e:
        pytest.skip(f"daam cannot be imported ({e}); install it with: {INSTALL}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))  # DAAM makes ~/.cache/daam/heads
        return _script().compare(tmp_path_factory.mktemp("daam"))


def test_same_trajectory_and_daams_levels_are_easels_without_the_middle_block(parity):
    """Both runs land on the same latents; DAAM records the down and up blocks' layers, not the middle block's
    (alone at the coarsest level in SD1's layout), with easel's layer count at every other level."""
    torch.testing.assert_close(parity.latents[1], parity.latents[0], rtol=1e-4, atol=1e-4)
    coarsest = min(parity.easel_layers, key=lambda s: s[0] * s[1])
    assert parity.easel_layers[coarsest] == 1
    assert {s: lv["layers"] for s, lv in parity.levels.items()} == {
        s: n for s, n in parity.easel_layers.items() if s != coarsest}
    assert len(parity.levels) == 2 and all(lv["heads"] == 2 for lv in parity.levels.values())


def test_per_level_sums_equal_daams_per_head_maps(parity):
    """Per query resolution, DAAM's per-(layer, head) maps of the cond half summed over steps, layers and heads,
    over the head count, are easel's sums of head-averaged probabilities (the uncond half left out by both)."""
    for size, lv in parity.levels.items():
        assert lv["easel"].max() > 0.1, size  # real attention mass, not an empty level
        torch.testing.assert_close(lv["easel"], lv["daam"], rtol=1e-4, atol=1e-5)


def test_global_map_is_easels_sums_aggregated_daams_way(parity):
    """DAAM's compute_global_heat_map() = (1/L) sum over its levels of bicubic(easel's sum) on its 64x64 grid,
    plus the term its clamp of each upsampled per-head map adds (taken from DAAM's per-head maps)."""
    assert parity.grid == 64 and parity.daam.shape == (len(parity.pieces), 64, 64)
    torch.testing.assert_close(parity.recon + parity.clamp, parity.daam, rtol=1e-4, atol=1e-6)
    assert parity.clamp.max() > 100 * 1e-6  # the clamp term matters: without it the maps would not match


def test_word_maps_match_daams_except_its_merge_of_every_occurrence(parity):
    """easel's word merge (mean of the word's BPE pieces) is DAAM's compute_word_heat_map for each word that
    occurs once; DAAM merges every occurrence of a word's pieces, so its "a" also takes the "a" piece of "and"."""
    assert parity.pieces[4:7] == ["a", "n", "d"]  # the tiny vocabulary splits "and"
    for word, (ours, theirs) in parity.words.items():
        if word != "a":
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    rows = [i for i, p in enumerate(parity.pieces) if p == "a"]
    assert rows == [1, 4, 7]
    torch.testing.assert_close((parity.recon + parity.clamp)[rows].mean(0), parity.words["a"][1], rtol=1e-4,
                               atol=1e-6)
