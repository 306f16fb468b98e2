"""model.py against the model card's plain transformers code, on the tiny random Idefics2."""

from __future__ import annotations

import pytest
from conftest import make_image

from idefics_cli.dev.tiny import CHAT_TEMPLATE, GENERATION
from idefics_cli.errors import IdeficsError, UsageError
from idefics_cli.runtime.model import ModelOptions, load_engine, start_load


def plain_inputs(model_dir, image, question, split=True):
    """The model card's code: AutoProcessor -> apply_chat_template -> processor(text, images)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, do_image_splitting=split)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor, processor(text=prompt, images=[image], return_tensors="pt")


def test_fixture_carries_idefics2_8b_tokenizer_template_and_settings(engine, tiny_model):
    import json
    import os

    tok = engine.processor.tokenizer
    assert tok.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<end_of_utterance>"]) == [
        32000, 32001, 32002]
    assert len(tok) == 32003 and tok.pad_token_id == 0
    assert engine.processor.chat_template == CHAT_TEMPLATE
    ip = engine.processor.image_processor
    assert ip.do_image_splitting and dict(ip.size) == {"shortest_edge": 378, "longest_edge": 980}
    assert list(ip.image_mean) == [0.5] * 3 and list(ip.image_std) == [0.5] * 3
    gen = json.load(open(os.path.join(tiny_model, "generation_config.json")))
    assert {k: gen[k] for k in GENERATION} == GENERATION
    for name, module in engine.model.named_modules():
        if type(module).__name__ == "Linear" and name != "lm_head":
            assert module.in_features % 64 == 0 and module.out_features % 64 == 0, name


@pytest.mark.parametrize("split", [True, False])
def test_build_inputs_equal_model_card_code(engine, tiny_model, split):
    image = make_image(500, 380, seed=3)
    _, expected = plain_inputs(tiny_model, image, "What is the total?", split)
    got = engine.build_inputs([([image], "What is the total?")], split=split)
    assert got.keys() == expected.keys()
    import torch

    for key in expected:  # the processor's own call: the same tensors
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    image_tokens = (got["input_ids"] == 32001).sum().item()
    assert image_tokens == (320 if split else 64)
    assert (got["input_ids"] == 32000).sum().item() == (6 if split else 2)
    with pytest.raises(IdeficsError, match="prepare"):  # the reference's pixels never reach the engine's vision path
        engine.generate(got)


def test_stream_generate_matches_plain_greedy_generate(engine, tiny_model):
    import torch

    image = make_image(300, 420, seed=5)
    processor, inputs = plain_inputs(tiny_model, image, "Read the page.")
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=10, do_sample=False)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    pieces = list(engine.stream_generate(engine.prepare([([image], "Read the page.")]), max_new_tokens=10))
    assert len(pieces) > 1 and "".join(pieces) == expected
    gen = engine.generate(engine.prepare([([image], "Read the page.")]), max_new_tokens=10)
    assert gen.text == expected and gen.completion_tokens == 10 and gen.finish_reason == "length"


def test_batch_with_left_padding_equals_single_answers(engine):
    batch = [([make_image(320, 240, 1)], "What is this?"),
             ([make_image(200, 500, 2)], "Please read every word of the page, slowly and carefully.")]
    inputs = engine.prepare(batch)
    assert inputs["attention_mask"][0, 0] == 0 and inputs["input_ids"][0, 0] == 0  # left padding with pad id 0
    batched = engine.generate_batch(inputs, max_new_tokens=8)
    single = [engine.generate_batch(engine.prepare([item]), max_new_tokens=8)[0] for item in batch]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]


def test_context_refused_up_front_with_pages_that_fit(engine):
    assert engine.check_context(2, "q?", 100) == engine.prompt_tokens(2, "q?")
    with pytest.raises(UsageError) as info:
        engine.check_context(1, "q?", 32700)
    assert "at most 0 pages fit" in info.value.one_line()
    with pytest.raises(UsageError, match="context"):
        engine.check_context(120, "q?", 512)


def test_four_bit_loads_linear4bit_and_answers(tiny_model):
    import bitsandbytes as bnb

    engine4 = load_engine(ModelOptions(model=tiny_model, quant="4bit", device="cpu", max_new_tokens=6))
    assert engine4.info["quantization"] == "nf4"
    layers = [m for m in engine4.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) > 10
    assert layers[0].weight.quant_state.quant_type == "nf4"
    assert engine4.model.config.quantization_config.bnb_4bit_use_double_quant  # the model card's settings
    assert not any(layer.weight.quant_state.nested for layer in layers)  # CPU: block scales expanded at load
    gen = engine4.generate(engine4.prepare([([make_image()], "What is it?")]))
    assert gen.completion_tokens == 6 and gen.text


def test_expanded_block_scales_change_no_logit(tiny_model):
    """CPU 4-bit: the double-quantized block scales expanded once give the very logits of the model card's load,
    for one token (decoding) and for several (prefill)."""
    import torch

    from idefics_cli.runtime.model import expand_block_scales

    card = start_load(ModelOptions(model=tiny_model, quant="4bit", device="cpu"), cpu_kernels=False).finish()
    states = [getattr(m.weight, "quant_state", None) for m in card.model.modules() if hasattr(m, "weight")]
    assert sum(s is not None and s.nested for s in states) > 10  # the model card's load: double-quantized
    inputs = (torch.tensor([[5, 900]]), torch.arange(100, 140).reshape(2, 20))
    with torch.inference_mode():
        before = [card.model(input_ids=ids).logits for ids in inputs]
        expand_block_scales(card.model)
        assert not any(s is not None and s.nested for s in states)
        assert all(torch.equal(card.model(input_ids=ids).logits, want) for ids, want in zip(inputs, before))


def test_packed_text_layers_answer_as_the_model_card_load(tiny_model):
    """Float32 CPU: the language model's layers and head run over prepacked weights (the originals dropped, the tied
    embedding kept); logits agree with the model card's load up to rounding, and the greedy answer is the same."""
    import torch

    options = ModelOptions(model=tiny_model, quant="none", device="cpu", max_new_tokens=12)
    card = start_load(options, cpu_kernels=False).finish()
    ours = load_engine(options)
    packed = [m for m in ours.model.modules() if type(m).__name__ == "PackedLinear"]
    text_layers = ours.model.config.text_config.num_hidden_layers
    assert len(packed) == 7 * text_layers + 1  # q, k, v, o, gate, up, down a layer, and the head
    assert all(m.weight is None for m in packed if m is not ours.model.lm_head)
    assert not any(type(m).__name__ == "PackedLinear" for m in ours.model.model.vision_model.modules())
    for ids in (torch.tensor([[5, 900]]), torch.arange(100, 140).reshape(2, 20)):
        with torch.inference_mode():
            want, got = card.model(input_ids=ids).logits, ours.model(input_ids=ids).logits
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    rows = [([make_image(seed=5)], "Read the page.")]
    assert ours.generate(ours.prepare(rows)).token_ids == card.generate(card.prepare(rows)).token_ids


def test_local_folder_without_safetensors_is_refused_before_unpickling(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle, never read")
    with pytest.raises(IdeficsError) as info:
        load_engine(ModelOptions(model=str(tmp_path)))
    assert info.value.code == "model_error" and "safetensors" in info.value.message


def test_corrupt_weights_fail_as_a_model_error_from_the_loading_thread(tmp_path, tiny_model):
    """The weights load in a thread beside the processor; its failure still reaches the caller as model_error."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(IdeficsError) as info:
        load_engine(ModelOptions(model=str(folder), device="cpu", quant="none"))
    assert info.value.code == "model_error"


def test_hub_id_not_cached_offline_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(IdeficsError) as info:
        load_engine(ModelOptions(model="someorg/not-cached-model", offline=True))
    assert info.value.code == "model_error" and "cache" in info.value.message


def test_docs_state_the_cpu_auto_batch_size_the_code_uses(engine):
    import pathlib
    import re

    page = (pathlib.Path(__file__).parent.parent / "docs" / "transcribe.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| `--batch-size"))
    assert engine.device == "cpu"
    assert re.search(rf"\b{engine.auto_batch_size()} on the CPU", row), row


def test_load_processor_is_the_one_loader_and_offline_stays_in_the_options(tiny_model, tmp_path, monkeypatch):
    """`load`, `crops` and `quantize` load the processor through `load_processor`: the runtime settings unless
    asked for the saved one, the same errors, and offline passed on as `local_files_only` without ever being
    written into the process environment."""
    import os

    import huggingface_hub.constants as constants

    from idefics_cli.runtime.model import load_processor

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    configured = load_processor(ModelOptions(model=tiny_model, split=False, offline=True))
    assert configured.image_processor.do_image_splitting is False and configured.tokenizer.padding_side == "left"
    saved = load_processor(ModelOptions(model=tiny_model, split=False, offline=True), configure=False)
    assert saved.image_processor.do_image_splitting is True  # as written in preprocessor_config.json
    with pytest.raises(IdeficsError, match="does not exist"):
        load_processor(ModelOptions(model=str(tmp_path / "missing")))
    with pytest.raises(IdeficsError) as info:
        load_processor(ModelOptions(model="someorg/not-cached-model", offline=True))
    assert info.value.message == "someorg/not-cached-model is not in the local cache (offline)"
    load_engine(ModelOptions(model=tiny_model, offline=True, quant="none", device="cpu"))
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ


def test_deferred_compile_compiles_on_the_first_call_with_its_options():
    import torch

    from idefics_cli.runtime.model import _deferred

    calls = []

    def compile_(fn, **kwargs):
        calls.append(kwargs)
        return torch.compile(fn, **kwargs)

    deferred = _deferred(compile_)
    double = deferred(lambda x: x * 2, backend="eager", dynamic=False)
    triple = deferred(backend="eager")(lambda x: x * 3)  # the decorator form, @torch.compile(...)
    assert calls == []
    x = torch.arange(4.0)
    assert torch.equal(double(x), x * 2) and torch.equal(double(x), x * 2)
    assert calls == [{"backend": "eager", "dynamic": False}]  # once, with the options given
    assert torch.equal(triple(x), x * 3) and calls[1:] == [{"backend": "eager"}]


@pytest.mark.parametrize("device", ["tpu", "gpu", "mps", "CPU", "cuda:x", None, 0])
def test_a_bad_device_is_a_usage_error_in_the_library_before_loading(tiny_model, device):
    """`load(device=...)` and the loader refuse what is no device as usage, before the model is looked for."""
    import idefics_cli
    from idefics_cli.runtime.model import resolve_device

    for call in (lambda: idefics_cli.load("/no/such/model", device=device),
                 lambda: idefics_cli.load(tiny_model, device=device, quant="none"),
                 lambda: start_load(ModelOptions(model="/no/such/model", device=device)),
                 lambda: resolve_device(device)):
        with pytest.raises(UsageError, match="is not a device") as info:
            call()
        assert info.value.exit_status == 2 and info.value.hint == "use auto, cpu, cuda or cuda:N"


def _truncated(tiny_model, folder) -> str:
    import shutil

    shutil.copytree(tiny_model, folder)
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    return str(folder)


@pytest.mark.parametrize("offline", [True, False])
def test_offline_a_broken_local_folder_says_what_is_wrong_not_a_cache_miss(tmp_path, tiny_model, offline):
    """Offline, a local folder that does not load says why (the weights' header), as online: it is no cache miss."""
    folder = _truncated(tiny_model, tmp_path / "tinybad")
    with pytest.raises(IdeficsError) as info:
        load_engine(ModelOptions(model=folder, device="cpu", quant="none", offline=offline))
    assert info.value.code == "model_error" and "local cache" not in info.value.message
    assert info.value.message.startswith(f"cannot load {folder}: Error while deserializing header"), info.value


def test_offline_a_cached_hub_model_that_does_not_load_says_why(tmp_path, tiny_model, monkeypatch):
    import huggingface_hub.constants as constants
    from test_doctor import fake_cache

    from idefics_cli.runtime.model import model_error

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = fake_cache(str(tmp_path / "hub"), "acme/tiny-idefics2", tiny_model)
    snapshot = tmp_path / "hub" / "models--acme--tiny-idefics2" / "snapshots" / commit
    with open(snapshot / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    options = ModelOptions(model="acme/tiny-idefics2", device="cpu", quant="none", offline=True)
    with pytest.raises(IdeficsError) as info:
        load_engine(options)
    assert info.value.message.startswith("cannot load acme/tiny-idefics2: Error while deserializing header")
    # a hub id whose files are not cached is the one failure that says so
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
        except LocalEntryNotFoundError as exc:
            raise OSError("We could not load the files") from exc
    except OSError as exc:
        missed = model_error(exc, options)
    assert missed.message == "acme/tiny-idefics2 is not in the local cache (offline)"
    other = model_error(ValueError("something else"), options)
    assert other.message == "cannot load acme/tiny-idefics2: something else"
