"""process.py's tune(): malloc and Pillow reuse freed big blocks after `tune()`; the user's own settings win."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import json, os, resource, sys
import numpy as np
from PIL import Image
from idefics_cli import process as allocator

def faults(work):
    work()  # once to warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        work()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def arrays():  # 64 MiB buffers, written, freed: what a vision chunk or a prefill's scores are
    a = np.ones(16 * 2**20, dtype=np.float32)
    a = None

page = Image.new("RGB", (1515, 1960), "white")
def images():  # a page's crops and resizes, as the image processor makes them
    for box in ((0, 0, 757, 980), (757, 0, 1515, 980), (0, 980, 757, 1960), (757, 980, 1515, 1960)):
        page.crop(box).resize((700, 900))
    page.resize((757, 980))

out = {"before": [faults(arrays), faults(images)]}
out["changed"] = allocator.tune()
out["after"] = [faults(arrays), faults(images)]
out["again"] = allocator.tune()
print(json.dumps(out))
"""


def probe(env_extra: dict) -> dict:
    import json
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PILLOW_")) and k != "GLIBC_TUNABLES"}
    env.pop("IDEFICS_ALLOCATOR", None)
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocators_reuse_big_blocks_instead_of_faulting_in_fresh_pages():
    out = probe({})
    assert out["changed"] == ["malloc", "pillow"] and out["again"] == ["malloc", "pillow"]
    (arrays_before, images_before), (arrays_after, images_after) = out["before"], out["after"]
    # 5 x 64 MiB written: fresh pages before (at least one fault per 2 MiB huge page), the reused heap after
    assert arrays_before >= 5 * 32 and arrays_after < arrays_before / 20
    assert images_before >= 50 and images_after < images_before / 4


@pytest.mark.parametrize("env, changed", [({"IDEFICS_ALLOCATOR": "default"}, []),
                                          ({"MALLOC_ARENA_MAX": "2"}, ["pillow"]),
                                          ({"PILLOW_BLOCKS_MAX": "0"}, ["malloc"])],
                         ids=["opted-out", "user-malloc", "user-pillow"])
def test_the_users_own_settings_are_left_alone(env, changed):
    if not sys.platform.startswith("linux") and "malloc" in changed:
        changed = [c for c in changed if c != "malloc"]
    assert probe(env)["changed"] == changed
