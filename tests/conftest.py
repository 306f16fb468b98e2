"""Shared fixtures: one tiny random Idefics2 (real idefics2-8b tokenizer and settings) per session, and one tiny
Idefics3 (SmolVLM-256M-Instruct's processor, template and special tokens)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n auto`: one torch thread per worker (and its subprocesses), no
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # oversubscribed cores spinning against each other


def _tiny(tmp_path_factory, family: str) -> str:
    from transformers.utils import logging

    from idefics_cli.dev.tiny import build

    logging.set_verbosity_error()
    return build(str(tmp_path_factory.mktemp(f"tiny-{family}")), family=family, seed=0)


def _loaded(folder: str, quant: str):
    """A tiny model loaded through the CLI's own loading code, float32 on the CPU, 8 new tokens."""
    from idefics_cli.runtime.model import ModelOptions, load_engine

    return load_engine(ModelOptions(model=folder, quant=quant, device="cpu", max_new_tokens=8))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Folder of a tiny random Idefics2 that loads exactly like idefics2-8b."""
    return _tiny(tmp_path_factory, "idefics2")


@pytest.fixture(scope="session")
def engine(tiny_model):
    """The tiny Idefics2, unquantized."""
    return _loaded(tiny_model, "none")


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory) -> str:
    """Folder of a tiny random Idefics3 that loads like SmolVLM-256M-Instruct (built once a session, ~5 s)."""
    return _tiny(tmp_path_factory, "idefics3")


@pytest.fixture(scope="session")
def engine3(tiny_idefics3):
    """The tiny Idefics3 (`--quant auto`: none)."""
    return _loaded(tiny_idefics3, "auto")


@pytest.fixture(scope="session")
def sharp_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model with a louder image path (perceiver attention values x10), so answers depend on the image.

    The stock tiny model's perceiver washes the image out and most pages get the same gibberish; with this
    one, pages that differ give different texts, so comparing batched and single answers means something.
    """
    import shutil

    import torch
    from transformers import Idefics2ForConditionalGeneration

    out = str(tmp_path_factory.mktemp("sharp-idefics2"))
    shutil.copytree(tiny_model, out, dirs_exist_ok=True)
    model = Idefics2ForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "perceiver_resampler" in name and name.endswith(("v_proj.weight", "o_proj.weight")):
                param.mul_(10)
    model.save_pretrained(out)
    return out


def until_eos(ids, eos_ids) -> list[int]:
    """Generated token ids up to and with the first end-of-sequence id (as the engine's rows end)."""
    ids = [int(t) for t in ids]
    return ids[: next((k + 1 for k, t in enumerate(ids) if t in eos_ids), len(ids))]


def make_image(width: int = 320, height: int = 240, seed: int = 0):
    """A small deterministic picture with some structure (so crops differ)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    for k in range(8):
        x = (seed * 37 + k * 53) % width
        y = (seed * 11 + k * 29) % height
        draw.rectangle([x, y, x + width // 6, y + height // 8], fill=((k * 40 + seed * 7) % 256, 90, 200 - k * 20))
    draw.text((10, 10), f"Invoice {seed}: total $ {seed * 17 + 3}.50", fill="black")
    return img


def make_pdf(path, n_pages: int = 3, size=(300, 200)) -> str:
    """A small PDF with n distinct pages (small page size keeps the tiny model fast)."""
    import pymupdf

    doc = pymupdf.open()
    for i in range(n_pages):
        page = doc.new_page(width=size[0], height=size[1])
        page.insert_text((20, 40 + 10 * (i % 5)), f"Page {i + 1} of the report", fontsize=14)
        page.draw_rect(pymupdf.Rect(20 + 5 * i, 80, 120 + 5 * i, 150), color=(0, 0, 1), fill=(i / n_pages, 0.5, 0.2))
    doc.save(str(path))
    doc.close()
    return str(path)


def run_idefics(*args, input: bytes | None = None, timeout: float = 300, env: dict | None = None,
                cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run the real `idefics` entry point in a subprocess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "idefics_cli", *map(str, args)], input=input, capture_output=True,
                          timeout=timeout, env=full_env, cwd=cwd)


_TRACE = ("import json, os, sys\n"
          "from idefics_cli.cli import app\n"
          "try:\n"
          "    app(sys.argv[1:], prog_name='idefics')\n"
          "finally:\n"
          "    with open(os.environ['IDEFICS_TRACE_FILE'], 'w') as f:\n"
          "        json.dump(sorted(m for m in os.environ['IDEFICS_TRACE_MODULES'].split() if m in sys.modules), f)\n")


def run_traced(*args, tmp_path, input: bytes | None = None, timeout: float = 300, env: dict | None = None,
               cwd: str | None = None,
               modules=("torch", "transformers")) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the `idefics` app in a subprocess; also returns which of `modules` (torch and transformers) it imported."""
    trace = os.path.join(str(tmp_path), "imported.json")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {}), "IDEFICS_TRACE_FILE": trace,
                "IDEFICS_TRACE_MODULES": " ".join(modules)}
    proc = subprocess.run([sys.executable, "-c", _TRACE, *map(str, args)], input=input, capture_output=True,
                          timeout=timeout, env=full_env, cwd=cwd)
    with open(trace) as f:
        return proc, json.load(f)


@pytest.fixture
def cli():
    """Invoke the Typer app in-process; returns the click Result (stdout and stderr kept apart)."""
    from typer.testing import CliRunner

    from idefics_cli.cli import app

    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


@pytest.fixture(scope="module")
def sharp_engine(sharp_model):
    """The sharpened tiny model loaded in float32 on the CPU, 8 new tokens, image splitting on."""
    from idefics_cli.runtime.model import ModelOptions, load_engine

    return load_engine(ModelOptions(model=sharp_model, quant="none", device="cpu", max_new_tokens=8, split=True))


@pytest.fixture
def make_scheduler(sharp_engine):
    """Serve schedulers on `sharp_engine`, each stopped (its jobs cancelled) when the test ends."""
    from idefics_cli.serve.cache import PrefixCache
    from idefics_cli.serve.scheduler import Scheduler

    made = []

    def make(cache_bytes: int = 2**30, max_batch: int = 4, max_queue: int = 16, ahead: int | None = None,
             start: bool = True):
        s = Scheduler(sharp_engine, PrefixCache(cache_bytes), max_batch=max_batch, max_queue=max_queue, ahead=ahead)
        if start:
            s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop(cancel=True, timeout=30)


def prefill_one(engine, ids, features=None, prefix=None):
    """runtime/kvcache.py's `prefill` for one prompt: (last logits [vocab], its KV)."""
    from idefics_cli.runtime.decode import Row
    from idefics_cli.runtime.kvcache import prefill

    logits, (kv,) = prefill(engine, [Row(ids, features, prefix, max_tokens=1)])
    return logits[0], kv
