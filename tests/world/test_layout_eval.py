"""The layout ControlNet's measure: is each object of the prompt on the blob drawn for it?"""
import dataclasses

from easel.world.benchmark import CORE_CATEGORIES, make_prompts
from easel.world.layout_eval import blob_owners, cases, layout_markdown, placement
from easel.world.render import render
from easel.world.scenes import Scene


def _cases():
    return cases(make_prompts(0, 4, CORE_CATEGORIES), 2, 64)


def test_renders_of_the_sketched_scenes_have_every_object_on_its_blob():
    chosen = _cases()
    images = [render(c.scene, 64) for c in chosen]
    rates = placement(images, chosen)
    assert rates["overall"] >= 0.97 and set(rates) == {*CORE_CATEGORIES, "overall"}


def test_objects_moved_off_their_blobs_are_not_counted():
    chosen = _cases()
    moved = []
    for c in chosen:  # mirror the scene left-right and top-bottom: every object leaves its blob (unless central)
        objects = tuple(dataclasses.replace(o, cx=1 - o.cx, cy=1 - o.cy) for o in c.scene.objects)
        moved.append(render(Scene(c.scene.background, objects, "moved", c.scene.seed), 64))
    assert placement(moved, chosen)["overall"] < 0.3


def test_each_blob_belongs_to_its_mention_and_counts_repeat():
    chosen = [c for c in _cases() if c.prompt.category == "counting"]
    for c in chosen:
        owners = blob_owners(c.prompt, c.scene)
        assert len(owners) == c.prompt.mentions[0].count == len(c.scene.objects)
        assert all(o.shape == want["shape"] and o.colour == want["colour"] for o, want in owners)


def test_every_image_gets_its_own_layout():
    places = {tuple((o.cx, o.cy) for o in c.scene.objects) for c in _cases()}
    assert len(places) == len(_cases())


def test_table_has_both_rows():
    row = {"on its blob": {"overall": 0.9, "position": 0.8}, "benchmark": {"overall": 0.7, "position": 0.5}}
    table = layout_markdown({"rows": {"with sketch": row, "without ControlNet": row}})
    assert "| with sketch: on its blob | 0.80 | 0.90 |" in table and "without ControlNet: benchmark" in table


def test_a_list_may_fill_its_blobs_either_way_round_a_relation_may_not():
    from easel.world.layout_eval import blobs_taken
    for category, want in (("two_object", [1, 1]), ("position", [0, 0])):
        c = next(c for c in _cases() if c.prompt.category == category)
        a, b = c.scene.objects
        swapped = (dataclasses.replace(a, cx=b.cx, cy=b.cy), dataclasses.replace(b, cx=a.cx, cy=a.cy))
        image = render(Scene(c.scene.background, swapped, "swapped", 0), 64)
        from easel.world.judge import parse
        assert blobs_taken(parse(image), c.prompt, c.scene) == want, category


def test_sheet_shows_sketch_with_and_without_for_cases_across_categories():
    from easel.world.layout_eval import layout_sheet
    chosen = _cases()  # 24 cases: every second one is picked for 12 rows-of-three
    images = [render(c.scene, 64) for c in chosen]
    sheet = layout_sheet({"cases": chosen, "images": {"with sketch": images, "without ControlNet": images}})
    assert sheet.width == 6 * 192 and sheet.height > 6 * 192  # 36 tiles, 6 per row, captions under each
