"""The built-in model's layout ControlNet (`shapeworld-layout`): found by name, fits the model, and puts the object
of the prompt where the sketch's blob is."""
import numpy as np
import pytest

import easel
from easel.pipelines.control_unit import ControlUnit
from easel.pipelines.request import GenerationRequest
from easel.weights.controlnet_load import list_controlnets, resolve_controlnet
from easel.weights.load import read_state_dict
from easel.weights.registry import BUILTIN_DIR, builtin_model
from easel.world.judge import parse
from easel.world.sketch import sketch_at

pytestmark = pytest.mark.skipif(builtin_model() is None, reason="this install has no built-in model")
SHIPPED = BUILTIN_DIR / "controlnet" / "shapeworld-layout.safetensors"


def test_found_by_name_and_listed():
    assert resolve_controlnet("shapeworld-layout") == SHIPPED
    assert SHIPPED in list_controlnets()
    meta = read_state_dict(SHIPPED)[1]
    assert meta["kind"] == "controlnet" and "blobs" in meta["condition"]


def test_the_object_lands_on_its_blob(one_thread):
    pipe = easel.load(None)
    place = (0.78, 0.78, 0.14)  # bottom right: where the model alone rarely puts a lone object
    sketch = sketch_at([place])
    req = GenerationRequest("a purple cross", seed=7, batch_size=4,
                            controlnets=[ControlUnit("shapeworld-layout", sketch)])
    hits = 0
    for g in pipe.generate(req):
        crosses = [d for d in parse(g.image) if d.shape == "cross" and d.colour == "purple"]
        hits += any(np.hypot(d.cx - place[0], d.cy - place[1]) < place[2] for d in crosses)
    assert hits >= 3, f"{hits}/4 purple crosses on the blob"
