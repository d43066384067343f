"""User datasets: the three listing conventions, kohya repeat folders, buckets without distortion, caption
changes, one clear line per bad file (skipped or refused), reproducible batches, and the --dry-run report."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from easel.training.dataset_folder import (DataOptions, DatasetError, UserDataset, fit_to_bucket, make_buckets,
                                           nearest_bucket, process_caption)
from tests.training.user_data import make_folder, shape_image


def test_sidecar_captions_and_kohya_repeat_folders(tmp_path):
    make_folder(tmp_path, 2)  # top level: 1 repeat
    make_folder(tmp_path, 3, sub="10_mydog")
    make_folder(tmp_path, 1, sub="plain")
    (tmp_path / "10_mydog" / "img00.txt").unlink()
    (tmp_path / "10_mydog" / "img00.caption").write_text("a  dog,\n  sitting")  # kohya's other suffix
    ds = UserDataset(tmp_path, DataOptions(resolution=32))
    repeats = {(it.group, it.repeats) for it in ds.items}
    assert repeats == {(tmp_path.name, 1), ("10_mydog", 10), ("plain", 1)}
    assert len(ds.items) == 6 and sum(it.repeats for it in ds.items) == 2 + 30 + 1
    assert "a dog, sitting" in [it.caption for it in ds.items]  # whitespace runs collapsed
    epoch = ds.epoch_batches(0, 4, seed=0)
    shown = sorted(i for b in epoch for i in b)
    assert shown == sorted(i for i, it in enumerate(ds.items) for _ in range(it.repeats))


def test_metadata_jsonl_and_csv(tmp_path):
    for i, colour in enumerate(["red", "blue"]):
        shape_image(colour).save(tmp_path / f"{colour}.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{c}.png", "text": f"a {c} disc"})
                                                       for c in ["red", "blue"]) + "\n")
    ds = UserDataset(tmp_path, DataOptions(resolution=32))
    assert [it.caption for it in ds.items] == ["a red disc", "a blue disc"]
    csv_path = tmp_path / "list.csv"
    csv_path.write_text('image,caption\nred.png,"a red disc, shiny"\nblue.png,blue\n')
    ds = UserDataset(csv_path, DataOptions(resolution=32))
    assert [it.caption for it in ds.items] == ["a red disc, shiny", "blue"]
    csv_path.write_text("name,words\nred.png,x\n")
    with pytest.raises(DatasetError, match=r"list.csv:2 needs a file column .* and a caption column"):
        UserDataset(csv_path, DataOptions(resolution=32))


def test_buckets_are_multiples_of_64_near_the_native_area():
    for res in (512, 768, 1024):
        buckets = make_buckets(res)
        assert (res, res) in buckets
        assert all(w % 64 == 0 and h % 64 == 0 and w * h <= res * res and max(w, h) / min(w, h) <= 2
                   for w, h in buckets)
    assert make_buckets(64) == [(64, 64)]  # the built-in model: its native size only
    assert nearest_bucket((1920, 1080), make_buckets(512)) == (640, 384)
    assert nearest_bucket((1000, 1000), make_buckets(512)) == (512, 512)


def test_fit_to_bucket_scales_and_crops_without_distortion():
    im = Image.new("RGB", (200, 100), "white")
    im.paste((0, 0, 0), (0, 0, 100, 100))  # left half black
    out, (top, left) = fit_to_bucket(im, (64, 64), None, random_crop=False)
    assert out.size == (64, 64) and (top, left) == (0, 32)  # scaled to 128x64 (ratio kept), centre crop
    px = out.load()
    assert px[0, 32] == (0, 0, 0) and px[63, 32] == (255, 255, 255) and px[31, 32][0] < 30 < px[33, 32][0]
    g = torch.Generator().manual_seed(3)
    crops = {fit_to_bucket(im, (64, 64), g, random_crop=True)[1] for _ in range(20)}
    assert len(crops) > 1 and all(t == 0 and 0 <= lft <= 64 for t, lft in crops)


def test_bad_files_are_one_line_each_then_skipped_or_refused(tmp_path):
    make_folder(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "broken.txt").write_text("broken")
    shape_image("red").save(tmp_path / "nocaption.png")
    shape_image("red", (10, 40)).save(tmp_path / "tiny.png")
    (tmp_path / "tiny.txt").write_text("tiny")
    lines = []
    ds = UserDataset(tmp_path, DataOptions(resolution=32), log=lines.append)
    assert len(ds.items) == 3 and len(lines) == 3 and all("\n" not in line for line in lines)
    text = "\n".join(lines)
    assert "unreadable image: " in text and "broken.png" in text
    assert "missing caption: " in text and "nocaption.txt" in text
    assert "too small: " in text and "10x40" in text and "--min-size" in text
    with pytest.raises(DatasetError, match=r"unreadable image: .*broken.png.*--on-bad skip"):
        UserDataset(tmp_path, DataOptions(resolution=32, on_bad="error"))
    assert len(UserDataset(tmp_path, DataOptions(resolution=32, min_size=8), log=lines.append).items) == 4
    with pytest.raises(DatasetError, match=r"no usable images .*\(2 skipped\)"):
        UserDataset(make_folder(tmp_path / "empty", 2, captions=False), DataOptions(resolution=32), log=lines.append)
    with pytest.raises(DatasetError, match="does not exist"):
        UserDataset(tmp_path / "nope", DataOptions(resolution=32))


def test_caption_dropout_and_tag_shuffle_keep_leading_tags():
    g = torch.Generator().manual_seed(0)
    opts = DataOptions(resolution=32, shuffle_tags=True, keep_tags=2)
    caption = "sks dog, photo, a, b, c, d, e"
    outs = {process_caption(caption, g, opts) for _ in range(30)}
    assert len(outs) > 5
    assert all(o.startswith("sks dog, photo, ") and sorted(o.split(", ")) == sorted(caption.split(", "))
               for o in outs)
    drop = DataOptions(resolution=32, caption_dropout=0.5)
    outs = [process_caption(caption, g, drop) for _ in range(200)]
    assert 60 < outs.count("") < 140 and set(outs) == {"", caption}
    with pytest.raises(DatasetError, match="--caption-dropout"):
        UserDataset("x", DataOptions(resolution=32, caption_dropout=1.0))


def test_batches_are_reproducible_and_hold_one_bucket(tmp_path):
    make_folder(tmp_path, 7, sizes=((40, 40), (60, 30), (30, 60)))
    opts = DataOptions(resolution=32, bucket_step=16)
    a, b = UserDataset(tmp_path, opts), UserDataset(tmp_path, opts)
    assert {it.bucket for it in a.items} == {(32, 32), (32, 16), (16, 32)}
    for step in range(12):
        idx = a.batch_indices(step, 2, seed=5)
        assert idx == b.batch_indices(step, 2, seed=5)
        assert len({a.items[i].bucket for i in idx}) == 1
        x, size = a.pixels(idx[0], None)
        w, h = a.items[idx[0]].bucket
        assert x.shape == (3, h, w) and -1 <= float(x.min()) and float(x.max()) <= 1
    assert a.batch_indices(0, 2, seed=5) != a.batch_indices(0, 2, seed=6) or \
        a.epoch_batches(0, 2, 5) != a.epoch_batches(0, 2, 6)


def test_dry_run_prints_the_data_and_writes_a_contact_sheet(tmp_path, capsys):
    from easel.cli import main
    from easel.weights.model_io import save_model
    from tests.conftest import make_tiny
    model = save_model(make_tiny(tmp_path / "m", "sd1"), tmp_path / "tiny.safetensors")
    data = make_folder(tmp_path / "data", 4, sizes=((40, 40), (64, 32)))
    (data / "img00.txt").write_text(" ".join(["red"] * 80))
    out = tmp_path / "out" / "mine.safetensors"
    assert main(["train", "lora", str(data), "--out", str(out), "--model", str(model), "--dry-run",
                 "--bucket-step", "16"]) == 0
    text = capsys.readouterr().out
    assert "4 images (4 samples per epoch with repeats), 0 skipped" in text
    assert "32x16: 2, 32x32: 2" in text and "1 past 75" in text
    sheet = Image.open(tmp_path / "out" / "mine_contact_sheet.png")
    assert sheet.width == 4 * 160 and not (tmp_path / "out" / "mine.safetensors").exists()
    assert main(["train", "lora", str(tmp_path / "missing"), "--out", str(out), "--model", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("easel: error: training data") and "does not exist" in err and "\n" not in err
