"""Schema fuzzing: schemathesis generates requests for every operation of /openapi.json (bounded: a few examples
each, no deadline flakiness) against a live server on the built-in model with limits that let jobs run. Wanted:
0 server errors, 0 responses outside the documented status codes, media types and schemas."""
from __future__ import annotations

import collections
import os
import warnings

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from easel.serve.app import Settings  # noqa: E402

EXAMPLES = int(os.environ.get("EASEL_FUZZ_EXAMPLES", 12))  # per operation: enough to reach each error path, small enough for CI on two cores
FUZZ_LIMITS = Settings(max_pixels=64 * 64, max_steps=2, max_batch=2, max_queue=4, max_body_bytes=256 * 1024)
SKIP = {("POST", "/api/v1/session"), ("DELETE", "/api/v1/session")}  # cookies only; no body to fuzz


def checks():
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )
    return (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)


def fuzz(url: str, examples: int = EXAMPLES) -> dict:
    """Run every operation `examples` times; {'calls', 'by_status', 'failures': [(operation, message)]}."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    report = {"calls": 0, "by_status": collections.Counter(), "failures": [],
              "by_operation": collections.defaultdict(collections.Counter)}
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) not in SKIP:
            _fuzz_operation(op, url, examples, report)
            _fuzz_operation(op, url, max(2, examples // 3), report, negative=True)
    return report


GENERATION = ("/api/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations")
SMALL_PNG = None


def small_png() -> str:
    """A 32x32 PNG as base64 (an init image or mask that passes every check)."""
    global SMALL_PNG
    if SMALL_PNG is None:
        import base64
        import io

        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
        SMALL_PNG = base64.b64encode(buf.getvalue()).decode()
    return SMALL_PNG


def tame(path: str, body: dict, data) -> dict:
    """The body with the costly or mostly-invalid fields drawn from values that run (the rest stays as generated),
    so that half the generation calls get past the checks and run a job on the tiny model."""
    small = st.sampled_from([None, 32, 64])
    if path == "/v1/images/generations":
        return {**body, "size": data.draw(st.sampled_from(["32x32", "64x64", "auto"])), "n": 1, "steps": 1,
                "response_format": "b64_json", "stream": False, "output_format": data.draw(st.sampled_from(
                    ["png", "jpeg", "webp", None])), "model": None, "sampler": None, "prompt": "a red star"}
    out = {**body, "width": data.draw(small), "height": data.draw(small), "steps": data.draw(st.integers(1, 2)),
           "batch_size": 1, "n_iter": data.draw(st.integers(1, 2)), "enable_hr": data.draw(st.booleans()),
           "hr_scale": 1.0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_second_pass_steps": 0, "seed_resize_from_w": 0,
           "seed_resize_from_h": 0, "mask_blur": data.draw(st.integers(0, 8)), "loras": [], "model": None}
    if path == "/api/v1/jobs":
        out.update(sampler=data.draw(st.sampled_from(["euler", "euler_a", "dpmpp_2m", "ddim", "uni_pc", "lcm"])),
                   scheduler=data.draw(st.sampled_from(["normal", "karras", "simple"])), refiner_checkpoint=None,
                   hr_sampler=None, hr_scheduler=None, init_images=data.draw(st.sampled_from([[], [small_png()]])),
                   mask=data.draw(st.sampled_from([None, small_png()])), preview_every=data.draw(st.integers(0, 2)),
                   outpaint_left=data.draw(st.sampled_from([0, 8])), outpaint_right=0, outpaint_up=0, outpaint_down=0,
                   inpaint_full_res_padding=data.draw(st.integers(0, 32)))
        if not out["init_images"]:
            out["mask"] = None
            out["outpaint_left"] = 0
    else:
        out.update(sampler_name=data.draw(st.sampled_from(["Euler", "Euler a", "DPM++ 2M Karras", "UniPC", None])),
                   scheduler=data.draw(st.sampled_from(["Automatic", "Karras", None])), sampler_index="Euler",
                   refiner_checkpoint=None, override_settings=None, hr_sampler_name=None, hr_scheduler=None,
                   hr_checkpoint_name=None, script_name=None, alwayson_scripts={}, save_images=False)
        if path == "/sdapi/v1/img2img":
            out.update(init_images=[small_png()], mask=data.draw(st.sampled_from([None, small_png()])),
                       outpaint_left=0, outpaint_right=0, outpaint_up=0, outpaint_down=0, mask_blur_x=4, mask_blur_y=4,
                       inpaint_full_res_padding=data.draw(st.integers(0, 32)))
    return out


def _fuzz_operation(op, url: str, examples: int, report: dict, negative: bool = False) -> None:
    """`examples` generated calls of one operation (`negative`: bodies and parameters that break the schema),
    each checked; failures are collected, not raised."""
    from schemathesis import GenerationMode
    mode = GenerationMode.NEGATIVE if negative else GenerationMode.POSITIVE
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        case = data.draw(op.as_strategy(generation_mode=mode))
        if not negative and isinstance(case.body, dict) and op.path in GENERATION and data.draw(st.booleans()):
            case.body = tame(op.path, case.body, data)
        response = case.call(base_url=url, timeout=120)
        report["calls"] += 1
        report["by_status"][response.status_code] += 1
        report["by_operation"][f"{op.method.upper()} {op.path}"][response.status_code] += 1
        try:
            # A full queue is a documented 503 with Retry-After, not a server error.
            chosen = checks()[1:] if response.status_code == 503 else checks()
            case.validate_response(response, checks=chosen)
        except BaseException as e:  # noqa: BLE001  (FailureGroup): note it and go on, so one run shows every problem
            report["failures"].append((f"{op.method.upper()} {op.path}", response.status_code, str(e)[:800]))
    try:
        run()
    except Unsatisfiable:
        assert negative  # an operation without parameters or body has no schema-breaking variant



def describe(failures: list[tuple]) -> str:
    """One paragraph per distinct (operation, status) failure."""
    first = {}
    for op, status, msg in failures:
        first.setdefault((op, status), msg)
    return "\n\n".join(f"{op} -> {status}: {msg}" for (op, status), msg in first.items())


@pytest.mark.slow
def test_schema_fuzzing_finds_no_server_error_or_schema_violation(start_server, tmp_path, monkeypatch):
    monkeypatch.setenv("EASEL_LORA_DIRS", str(tmp_path))  # only the built-in LoRA
    monkeypatch.chdir(tmp_path)  # save_images writes under ./outputs
    (tmp_path / "train_root" / "empty").mkdir(parents=True)  # training on: its checks are fuzzed too (no dataset
    # has images, so no generated request starts a training run)
    server = start_server(Settings(**(FUZZ_LIMITS.__dict__ | {"train_root": str(tmp_path / "train_root"),
                                                              "max_train_steps": 2})))
    report = fuzz(server.url)
    print(f"\nfuzz: {report['calls']} calls, by status {dict(sorted(report['by_status'].items()))}, "
          f"{len(report['failures'])} failures")
    assert report["calls"] > 100
    errors = [f for f in report["failures"] if f[1] >= 500 and f[1] != 503]
    assert not errors, describe(errors)
    # The web UI's own routes (easel/serve/ui.py) are its engineer's: their schema findings are warned about here.
    ui = [f for f in report["failures"] if f[0].split(" ")[1].startswith("/ui/")]
    if ui:
        warnings.warn(f"UI routes outside their documented responses:\n{describe(ui)}")
    others = [f for f in report["failures"] if f not in ui]
    assert not others, describe(others)
    assert server.queue.queued() <= FUZZ_LIMITS.max_queue  # and it still answers
    import httpx
    assert httpx.get(f"{server.url}/api/v1/samplers", timeout=30).status_code == 200
