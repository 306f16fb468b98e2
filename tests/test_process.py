"""process.py: a program that loads the model keeps its own process settings; the commands' opt in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from idefics_cli.process import one_malloc_arena

PROGRAM = r"""
import json, logging, os, sys, warnings
import accelerate, huggingface_hub, torch, transformers  # what a program using the library has imported, with
from transformers import Idefics2ForConditionalGeneration  # the filters and levels they set on import
from huggingface_hub import constants
from PIL import Image

warnings.simplefilter("default")  # the program's own choices
warnings.filterwarnings("error", message="program's own")
for name, level in (("transformers", logging.INFO), ("bitsandbytes", logging.DEBUG), ("kernels", logging.INFO),
                    ("huggingface_hub", logging.INFO), ("", logging.DEBUG)):
    logging.getLogger(name).setLevel(level)

def state():
    return {"filters": [repr(f) for f in warnings.filters],
            "levels": {name: logging.getLogger(name).level
                       for name in ("transformers", "bitsandbytes", "kernels", "huggingface_hub", "")},
            "environ": dict(os.environ), "hub_offline": constants.HF_HUB_OFFLINE,
            "kernels": repr(sys.modules.get("kernels")), "pillow_blocks": Image.core.get_blocks_max(),
            "torch_compile": id(torch.compile), "compiler_imported": "torch._inductor.compile_fx" in sys.modules}

before = state()
import idefics_cli
from idefics_cli import process as allocator

engine = idefics_cli.load(sys.argv[1], quant="4bit", device="cpu", tune_process=sys.argv[2] == "opt-in")
after = state()
print(json.dumps({"before": before, "after": after, "allocator": allocator._done,
                  "quant": engine.options.quant, "bitsandbytes": "bitsandbytes" in sys.modules}))
"""


def run_program(tiny_model: str, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TOKENIZERS_PARALLELISM", "IDEFICS_DEBUG", "IDEFICS_ALLOCATOR", "PILLOW_BLOCKS_MAX")}
    done = subprocess.run([sys.executable, "-c", PROGRAM, tiny_model, mode], capture_output=True, text=True,
                          env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_program_that_loads_the_model_keeps_its_own_process_settings(tiny_model):
    out = run_program(tiny_model, "library")
    assert out["quant"] == "4bit" and out["bitsandbytes"]  # bitsandbytes was imported, and used
    before, after = out["before"], out["after"]
    assert after["filters"] == before["filters"]
    assert after["levels"] == before["levels"]
    assert after["environ"] == before["environ"]  # TOKENIZERS_PARALLELISM, HF_HUB_OFFLINE, MALLOC_* untouched
    assert after["hub_offline"] == before["hub_offline"] and after["kernels"] == before["kernels"]
    assert after["pillow_blocks"] == before["pillow_blocks"] and out["allocator"] is None  # allocators untouched
    # bitsandbytes' import compiled its fallback kernels through our deferred torch.compile: torch's own is back,
    # and its compiler was never imported
    assert after["torch_compile"] == before["torch_compile"] and not after["compiler_imported"]


def test_opting_in_gives_a_program_the_commands_settings(tiny_model):
    out = run_program(tiny_model, "opt-in")
    before, after = out["before"], out["after"]
    assert after["environ"] == {**before["environ"], "TOKENIZERS_PARALLELISM": "false"}
    assert after["levels"]["bitsandbytes"] == after["levels"]["transformers"] == 40  # errors only
    assert after["levels"]["huggingface_hub"] == 40 and after["levels"][""] == before["levels"][""]
    assert len(after["filters"]) > len(before["filters"])
    assert after["hub_offline"] == before["hub_offline"]
    assert "pillow" in out["allocator"] and after["pillow_blocks"] >= 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_one_malloc_arena_is_accepted_by_glibc():
    assert one_malloc_arena() is True
