"""quantize.py and `idefics quantize`: the saved nf4 folder loads Linear4bit layers as saved, answers as --quant 4bit,
is smaller."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_image

from idefics_cli.runtime.model import ModelOptions, load_engine
from idefics_cli.tasks.quantize import weights_bytes


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    from typer.testing import CliRunner

    from idefics_cli.cli import app

    out = tmp_path_factory.mktemp("q") / "tiny-nf4"
    result = CliRunner().invoke(app, ["quantize", str(out), "--model", tiny_model, "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    assert "weights:" in result.stderr and "->" in result.stderr
    return str(out)


def linear4bit(model) -> dict:
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_saved_folder_is_nf4_and_smaller(quantized, tiny_model):
    with open(os.path.join(quantized, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"]
    names = set(os.listdir(quantized))
    assert {"model.safetensors", "generation_config.json", "processor_config.json", "tokenizer.json",
            "chat_template.jinja"} <= names
    assert weights_bytes(quantized) < weights_bytes(tiny_model)
    assert not [n for n in os.listdir(os.path.dirname(quantized)) if n.startswith(".idefics-quantize-")]


def test_loads_linear4bit_without_requantizing(quantized, tiny_model):
    saved = load_engine(ModelOptions(model=quantized, quant="4bit", device="cpu")).model
    fresh = load_engine(ModelOptions(model=tiny_model, quant="4bit", device="cpu")).model
    saved_layers, fresh_layers = linear4bit(saved), linear4bit(fresh)
    assert saved_layers and saved_layers.keys() == fresh_layers.keys()
    for name, layer in saved_layers.items():
        assert layer.weight.dtype == torch.uint8, name  # packed nf4 straight from disk
        assert torch.equal(layer.weight.data, fresh_layers[name].weight.data), name
        assert layer.weight.quant_state.quant_type == "nf4"


def test_answers_exactly_as_quant_4bit_on_the_original(cli, quantized, tiny_model, tmp_path):
    img = tmp_path / "page.png"
    make_image(200, 150, seed=5).save(img)
    args = [img, "What is the total?", "--json", "--device", "cpu", "--max-new-tokens", "8"]
    original = cli("ask", *args, "--model", tiny_model, "--quant", "4bit")
    saved = cli("ask", *args, "--model", quantized, "--quant", "4bit")
    assert original.exit_code == 0 and saved.exit_code == 0, (original.stderr, saved.stderr)
    a, b = json.loads(original.stdout), json.loads(saved.stdout)
    assert a["answer"] and a["answer"] == b["answer"]
    assert a["usage"] == b["usage"] and b["model"]["quantization"] == "nf4"


def test_refuses_a_folder_that_is_not_empty(cli, tiny_model, quantized):
    result = cli("quantize", quantized, "--model", tiny_model, "--device", "cpu")
    assert result.exit_code == 2 and "not an empty folder" in result.stderr and result.stdout == ""


def test_saved_files_follow_the_umask(quantized, tiny_model):
    """transformers writes weights 0600; the tiny model and a quantized copy are readable like any other output."""
    from idefics_cli.tasks.writers import umask

    for folder in (quantized, tiny_model):
        modes = {name: os.stat(os.path.join(folder, name)).st_mode & 0o777 for name in os.listdir(folder)}
        assert modes and set(modes.values()) == {0o666 & ~umask()}, modes


def test_unwritable_out_dir_fails_before_the_model_loads(tmp_path, tiny_model):
    from conftest import run_traced

    (tmp_path / "a-file").write_text("x")
    for out_dir in (tmp_path / "a-file" / "nf4", "/proc/idefics-nf4"):
        res, imported = run_traced("quantize", out_dir, "--model", tiny_model, "--device", "cpu", tmp_path=tmp_path)
        stderr = res.stderr.decode()
        assert res.returncode == 4 and stderr.startswith("error [output_error]: "), stderr
        assert len(stderr.strip().splitlines()) == 1 and imported == []


def test_a_saved_nf4_checkpoint_says_nf4_whatever_quant_asks(cli, quantized, tmp_path):
    """The answer's model info states what is loaded, as doctor does: a checkpoint saved in nf4 loads in nf4 (saying
    why) even with --quant none; the options, and so the transcribe settings hash, keep what was asked."""
    from idefics_cli.tasks.pipeline import TranscribeRequest

    img = tmp_path / "page.png"
    make_image(120, 90, seed=2).save(img)
    saved = {"quantization": "nf4", "quantization_reason": "the checkpoint is saved in nf4"}
    for quant in ("none", "4bit", "auto"):
        answer = cli("ask", img, "What?", "--json", "--model", quantized, "--device", "cpu", "--quant", quant,
                     "--max-new-tokens", "2")
        assert answer.exit_code == 0, answer.stderr
        model = json.loads(answer.stdout)["model"]
        assert {k: model[k] for k in saved} == saved, (quant, model)
        doctor = json.loads(cli("doctor", "--json", "--model", quantized, "--device", "cpu", "--quant", quant).stdout)
        assert {k: doctor["setup"][k] for k in saved} == saved, (quant, doctor["setup"])
    asked = ModelOptions(model=quantized, quant="none", device="cpu")
    engine = load_engine(asked)
    assert engine.info["quantization"] == "nf4" and linear4bit(engine.model)
    assert engine.options == asked  # what `Model.transcribe` hashes: as asked, as before
    assert TranscribeRequest([str(img)], None, engine.options).settings_hash == \
        TranscribeRequest([str(img)], None, asked).settings_hash


def test_an_already_quantized_model_is_a_usage_error_before_it_loads(cli, quantized, tmp_path):
    """Quantizing a saved nf4 folder again loaded it, then failed in save_pretrained with an internal
    NotImplementedError."""
    out = tmp_path / "again"
    result = cli("quantize", out, "--model", quantized, "--device", "cpu")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [usage]: ") and "already quantized" in lines[0], lines
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_an_out_dir_that_is_a_symlink_is_written_through_it(cli, tiny_model, tmp_path):
    """OUT_DIR a symlink to an empty folder, or to a folder still to make: the model was loaded and saved, then the
    rename onto the link failed (`output_error: Not a directory`) and the work was lost."""
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "to-empty")
    os.symlink(tmp_path / "later", tmp_path / "to-later")
    for link, target in (("to-empty", "empty"), ("to-later", "later")):
        result = cli("quantize", tmp_path / link, "--model", tiny_model, "--device", "cpu")
        assert result.exit_code == 0, result.stderr
        assert result.stdout == f"{tmp_path / link}\n"
        assert os.path.islink(tmp_path / link) and "model.safetensors" in os.listdir(tmp_path / target)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".idefics-quantize-")]


def test_a_full_disk_while_saving_is_an_output_error_and_leaves_nothing(tiny_model, tmp_path):
    """safetensors reports a failed write with its own SafetensorError, not an OSError: a full disk (here a file
    size limit) was an internal error (exit 1) instead of output_error (exit 4)."""
    import resource
    import signal
    import subprocess
    import sys

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is EFBIG, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = subprocess.run([sys.executable, "-m", "idefics_cli", "quantize", str(tmp_path / "nf4"), "--model",
                             tiny_model, "--device", "cpu"], capture_output=True, timeout=300, preexec_fn=limited,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 4 and len(lines) == 1 and lines[0].startswith("error [output_error]: "), lines
    assert result.stdout == b"" and os.listdir(tmp_path) == []


def test_a_failed_quantize_leaves_no_folder_it_made(cli, tiny_model, quantized, tmp_path):
    """OUT_DIR's missing parents were made before the model loaded: a model that could not be loaded (here an
    already quantized one; a hub id not cached, a damaged file, no GPU) left them behind, empty."""
    (tmp_path / "kept").mkdir()
    result = cli("quantize", tmp_path / "kept" / "new" / "deeper" / "nf4", "--model", quantized, "--device", "cpu")
    assert result.exit_code == 2 and result.stdout == "", result.stderr
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
