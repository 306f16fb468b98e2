"""doctor.py and `idefics doctor`: every field, a real bitsandbytes 4-bit matmul, the cache lookup, the estimate and the
verdict."""

from __future__ import annotations

import json
import os
import re
import shutil

import huggingface_hub.constants

from idefics_cli.tasks.doctor import check_4bit, memory_estimate, model_files

TOP = {"schema", "ok", "reason", "versions", "system", "cuda", "setup", "bnb_4bit", "model", "estimate", "extras"}
VERSIONS = {"python", "torch", "transformers", "bitsandbytes", "accelerate", "pymupdf", "pillow", "huggingface_hub",
            "llguidance", "jsonschema", "idefics_cli"}
BNB = {"ran", "ok", "device", "dtype", "max_error", "quantization_error", "tolerance", "error", "seconds"}
MODEL = {"id", "revision", "local_folder", "available", "path", "commit", "missing", "unreadable", "size_bytes",
         "pre_quantized"}
ESTIMATE = {"parameters", "quantized_parameters", "bytes_per_quantized_parameter", "weights_bytes",
            "image_tokens_per_image", "images_per_page", "prompt_tokens", "max_new_tokens", "kv_cache_bytes",
            "activations_bytes", "overhead_bytes", "total_bytes", "free_bytes", "fits"}


def test_json_has_every_field_and_a_real_4bit_check(cli, tiny_model, engine):
    result = cli("doctor", "--json", "--model", tiny_model, "--device", "cpu", "--quant", "4bit")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == TOP and report["schema"] == "idefics-cli.doctor/1"
    assert report["ok"] is True and report["reason"] is None
    assert set(report["versions"]) == VERSIONS and report["versions"]["bitsandbytes"]
    assert set(report["cuda"]) == {"available", "version", "devices"}
    assert report["system"]["ram_available_bytes"] > 0 and report["system"]["cpus"] >= 1
    assert report["setup"] == {"model": tiny_model, "revision": None, "quant": "4bit", "quantization": "nf4",
                               "quantization_reason": "--quant 4bit", "dtype": "float32", "device": "cpu",
                               "split": True}
    bnb = report["bnb_4bit"]
    assert set(bnb) == BNB and bnb["ran"] and bnb["ok"] and bnb["device"] == "cpu"
    assert bnb["max_error"] <= bnb["tolerance"]
    assert 0.01 < bnb["quantization_error"] < 0.25  # nf4 really rounded the weights: not a float shortcut
    assert set(report["model"]) == MODEL
    assert report["model"]["available"] and report["model"]["local_folder"] and report["model"]["missing"] == []
    est = report["estimate"]
    assert set(est) == ESTIMATE
    dropped = sum(m.packed.numel() for m in engine.model.modules() if getattr(m, "weight", 0) is None)  # prepacked
    assert est["parameters"] == sum(p.numel() for p in engine.model.parameters()) + dropped  # from config.json
    assert 0 < est["quantized_parameters"] < est["parameters"]
    assert est["image_tokens_per_image"] == 64 and est["images_per_page"] == 5
    assert est["total_bytes"] == est["weights_bytes"] + est["kv_cache_bytes"] + est["activations_bytes"] + est[
        "overhead_bytes"]
    assert est["fits"] is True
    assert set(report["extras"]) == {"ray", "serve", "mcp", "docling"}  # --schema is core (llguidance)
    for extra in report["extras"].values():
        assert set(extra) == {"installed", "packages", "enables", "install"} and extra["enables"]


def test_no_split_and_no_quant_change_the_estimate(cli, tiny_model):
    base = json.loads(cli("doctor", "--json", "--model", tiny_model, "--device", "cpu", "--quant", "4bit"
                          ).stdout)["estimate"]
    other = json.loads(cli("doctor", "--json", "--model", tiny_model, "--device", "cpu", "--no-split",
                           "--quant", "none").stdout)["estimate"]
    assert other["images_per_page"] == 1 and other["prompt_tokens"] < base["prompt_tokens"]
    assert other["weights_bytes"] > base["weights_bytes"]  # 4 bytes/param float32 vs ~0.52 for nf4 linears


def test_human_report_and_missing_model_exit_5(cli, tiny_model, tmp_path):
    result = cli("doctor", "--model", tiny_model, "--device", "cpu")
    assert result.exit_code == 0
    assert "verdict    ✓ ready" in result.stdout and "bitsandbytes nf4 matmul on cpu" in result.stdout
    assert "extras     ray" in result.stdout and "serve" in result.stdout and "llguidance" in result.stdout

    result = cli("doctor", "--json", "--model", str(tmp_path / "nothing-here"), "--device", "cpu")
    assert result.exit_code == 5
    report = json.loads(result.stdout)
    assert report["ok"] is False and "does not exist" in report["reason"]
    assert len(result.stderr.strip().splitlines()) == 1 and "error [model_error]" in result.stderr


def test_human_report_gives_each_extra_its_name_then_its_mark(cli, tiny_model):
    """`docling` (7 letters) is as wide as the name column was: its line read `docling- not installed`."""
    out = cli("doctor", "--model", tiny_model, "--device", "cpu", "--quant", "none").stdout.splitlines()
    lines = out[[k for k, line in enumerate(out) if line.startswith("extras")][0]:-1]  # up to the verdict
    assert [line.removeprefix("extras").split()[0] for line in lines] == ["ray", "serve", "mcp", "docling"], out
    for line in lines:
        assert re.match(r"(extras| ) +[a-z]+ +(✓|- not installed) ", line), line


def test_a_model_folder_that_is_missing_or_a_file_is_said_so(cli, tiny_model, tmp_path):
    """The reason was "X is not complete in the local folder, missing X": for no folder at all, and for a file
    (`--model model/config.json`), which is there. It now says what `ask` says."""
    for model, says in ((str(tmp_path / "nothing-here"), "does not exist"),
                        (os.path.join(tiny_model, "config.json"), "is not a folder")):
        result = cli("doctor", "--json", "--model", model, "--device", "cpu")
        assert result.exit_code == 5
        assert json.loads(result.stdout)["reason"] == f"model folder {model!r} {says}", result.stdout
        assert result.stderr.startswith("error [model_error]: ") and len(result.stderr.strip().splitlines()) == 1


def test_images_per_page_are_what_the_image_processor_makes(tiny_model, tmp_path):
    """Not a fixed 5: Idefics2 splitting makes 4 crops + the page (1 without), as the real processor does for a
    page, and an image processor that tiles differently (Idefics3's grid) is counted as it tiles."""
    from PIL import Image
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from idefics_cli.runtime.model import ModelOptions, load_processor
    from idefics_cli.tasks.crops import model_images

    page = Image.new("RGB", (1386, 1960), "white")  # a portrait page at the default render size
    for split in (True, False):
        est = memory_estimate(os.path.join(tiny_model, "config.json"),
                              os.path.join(tiny_model, "processor_config.json"), "4bit", split, 4, 16, False)
        seen, _, _ = model_images(load_processor(ModelOptions(model=tiny_model, split=split)), page)
        assert est["images_per_page"] == len(seen) == (5 if split else 1)

    grid = tmp_path / "grid"
    grid.mkdir()
    shutil.copy(os.path.join(tiny_model, "config.json"), grid)
    (grid / "processor_config.json").write_text(json.dumps({"image_seq_len": 81}))
    tiler = Idefics3ImageProcessorPil()
    tiler.save_pretrained(grid)
    made = tiler([[page]], return_tensors="pt")["pixel_values"].shape[1]
    est = memory_estimate(str(grid / "config.json"), str(grid / "processor_config.json"), "4bit", True, 4, 16, False)
    assert made > 5 and est["images_per_page"] == made and est["image_tokens_per_image"] == 81
    assert est["prompt_tokens"] == 81 * made + made + 1 + 32


def test_estimate_counts_the_cpu_copy_of_a_tied_head(tmp_path, tiny_model):
    """Float32 on the CPU, a head that shares the input embedding gets a prepacked copy: its bytes count once more."""
    config = json.load(open(os.path.join(tiny_model, "config.json")))
    text = config["text_config"]
    estimates = {}
    for tied in (False, True):
        folder = tmp_path / str(tied)
        shutil.copytree(tiny_model, folder)
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tied,
                                                        "text_config": {**text, "tie_word_embeddings": tied}}))
        for cuda, nbytes in ((False, 4), (True, 4), (False, 2)):
            est = memory_estimate(str(folder / "config.json"), os.path.join(tiny_model, "processor_config.json"),
                                  "none", False, nbytes, 16, cuda)
            estimates[tied, cuda, nbytes] = est["weights_bytes"]
    head = text["vocab_size"] * text["hidden_size"]
    assert estimates[False, True, 4] - estimates[True, True, 4] == head * 4  # a tied head is one weight fewer
    assert estimates[False, False, 2] - estimates[True, False, 2] == head * 2
    assert estimates[True, False, 4] == estimates[False, False, 4]  # ... but for its float32 CPU copy


def fake_cache(cache: str, repo: str, model_dir: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay a model folder out the way huggingface_hub caches a snapshot."""
    base = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(model_dir, os.path.join(base, "snapshots", commit))
    return commit


def test_cached_model_is_found_with_its_commit(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = fake_cache(str(tmp_path), "acme/tiny-idefics2", tiny_model)
    found = model_files("acme/tiny-idefics2", None)
    assert found["available"] and found["commit"] == commit and not found["local_folder"]
    os.remove(os.path.join(found["path"], "model.safetensors"))
    found = model_files("acme/tiny-idefics2", None)
    assert not found["available"] and found["missing"] == ["model.safetensors"]
    assert not model_files("acme/not-pulled", None)["available"]


def test_check_4bit_half_precision_and_failure():
    import torch

    half = check_4bit("cpu", torch.bfloat16)
    assert half["ran"] and half["ok"] and half["dtype"] == "bfloat16" and half["max_error"] <= half["tolerance"]
    broken = check_4bit("no-such-device", torch.float32)
    assert broken["ok"] is False and broken["ran"] is False and broken["error"]


def test_json_verdict_when_the_model_is_not_cached(tmp_path):
    """Offline with a hub model that is not cached: one error line, exit 5, and still a JSON verdict on stdout."""
    from conftest import run_idefics

    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "IDEFICS_MODEL": ""}
    res = run_idefics("doctor", "--json", "--offline", env=env, timeout=60)
    assert res.returncode == 5
    assert res.stderr.decode().strip().startswith("error [model_error]: HuggingFaceM4/idefics2-8b is not in the")
    report = json.loads(res.stdout)
    assert report == {"schema": "idefics-cli.doctor/1", "ok": False,
                      "reason": "HuggingFaceM4/idefics2-8b is not in the local cache (offline)"}


def test_a_model_whose_files_cannot_be_read_is_not_ready(cli, tiny_model, tmp_path):
    """doctor reads what it can without loading weights: each safetensors header (truncated in the header or in the
    data it maps) and config.json; what does not read is a ✗ line, the verdict and exit 5, in a fraction of a load."""
    cases = {"header": ("model.safetensors", 1000, "Error while deserializing header"),
             "data": ("model.safetensors", -100, "file not fully covered"),
             "config": ("config.json", 10, "config.json: JSONDecodeError")}
    for name, (file, size, why) in cases.items():
        folder = tmp_path / name
        shutil.copytree(tiny_model, folder)
        with open(folder / file, "r+b") as f:
            f.truncate(size if size > 0 else os.path.getsize(folder / file) + size)
        found = model_files(str(folder), None)
        assert not found["available"] and found["missing"] == [] and len(found["unreadable"]) == 1
        assert found["unreadable"][0].startswith(f"{file}: ") and why in found["unreadable"][0], found
        result = cli("doctor", "--model", folder, "--device", "cpu", "--quant", "none")
        assert result.exit_code == 5, (name, result.stdout, result.stderr)
        assert f"model      ✗ local folder, cannot be read: {file}: " in result.stdout
        assert "✓ ready" not in result.stdout and "verdict    ✗ not ready: " in result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0]
        assert lines[0].startswith("error [model_error]: this setup cannot run: ")
    assert model_files(tiny_model, None)["unreadable"] == []
    index = tmp_path / "header" / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-1.safetensors"}}')  # the shards it names are what is read
    assert model_files(str(index.parent), None)["missing"] == ["model-1.safetensors"]
    index.write_text("[]")
    assert model_files(str(index.parent), None)["unreadable"][0].startswith(f"{index.name}: AttributeError")
    for shard in (["a.safetensors"], {"a": 1}, 5):  # not file names: a finding, not a crash
        index.write_text(json.dumps({"weight_map": {"a": shard}}))
        assert model_files(str(index.parent), None)["unreadable"][0].startswith(f"{index.name}: "), shard
    with open(os.path.join(tiny_model, "config.json")) as f:
        config = json.load(f)
    (tmp_path / "config" / "config.json").write_text(json.dumps({**config, "quantization_config": "bnb"}))
    found = model_files(str(tmp_path / "config"), None)
    assert not found["available"] and found["unreadable"][0].startswith("config.json: ValueError: "), found


def test_a_bad_device_is_never_ready_in_the_library():
    from idefics_cli.interface import ModelOptions
    from idefics_cli.tasks.doctor import diagnose

    report = diagnose(ModelOptions(model="/no/such/model", device="tpu"))
    assert report["ok"] is False and "--device 'tpu' is not a device" in report["reason"]


def test_a_checkpoint_of_another_architecture_is_not_ready(cli, tiny_model, tmp_path):
    """The files read, but `ask` would refuse the model type: doctor says so and exits 5, as the load would."""
    folder = tmp_path / "llava"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    result = cli("doctor", "--model", folder, "--device", "cpu", "--quant", "none")
    assert result.exit_code == 5 and "✓ ready" not in result.stdout, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a llava model; idefics-cli runs" in lines[0], lines
