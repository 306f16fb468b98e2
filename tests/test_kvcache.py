"""kvcache.py: in-place key/value layers give the same tensors, logits and greedy answers as transformers'
DynamicCache (growing past the spare room; a sliding window applied by the mask over every position kept), and never
write a tensor they were given (the serve prefix cache's invariant); on the tiny random Idefics2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import make_image, prefill_one, until_eos

from idefics_cli.interface import user_turn
from idefics_cli.runtime import kvcache as prefill_module
from idefics_cli.runtime.kvcache import KV, SPARE, KVBatch, new_cache, room_layer
from idefics_cli.runtime.model import ModelOptions, load_engine
from idefics_cli.serve.scheduler import encode_images, prefix_length, prompt_ids


def test_importing_kvcache_imports_no_torch():
    code = "import sys, idefics_cli.runtime.kvcache\nprint([m for m in ('torch', 'transformers') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr[-500:]


@pytest.mark.parametrize("spare", [1, 2, SPARE])
def test_a_layer_returns_and_keeps_what_transformers_layer_does(spare):
    import torch
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    ours, theirs = room_layer()(spare=spare), DynamicLayer()
    handed_out = []
    for step, n in enumerate([4, 1, 1, 3, 1, 1, 1, 1, 2, 1, 1, 1]):
        k, v = torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 4)
        got, want = ours.update(k, v), theirs.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), step
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)
        handed_out.append((got[0], got[0].clone()))
    assert all(torch.equal(view, copy) for view, copy in handed_out)  # append-only: nothing handed out changed
    # the base class's other operations assign .keys/.values: adopted, and the next update still agrees
    for op in (lambda layer: layer.batch_select_indices(torch.tensor([1, 0])),
               lambda layer: layer.reorder_cache(torch.tensor([0, 0])),
               lambda layer: layer.batch_repeat_interleave(2)):
        op(ours)
        op(theirs)
        k, v = torch.randn(*theirs.keys.shape[:2], 1, 4), torch.randn(*theirs.keys.shape[:2], 1, 4)
        assert all(torch.equal(a, b) for a, b in zip(ours.update(k, v), theirs.update(k, v)))
    ours.crop(-2)
    theirs.crop(-2)
    assert torch.equal(ours.keys, theirs.keys) and ours.get_seq_length() == theirs.get_seq_length()
    ours.reset()
    theirs.reset()
    assert ours.get_seq_length() == theirs.get_seq_length() == 0


def test_a_cache_over_tensors_never_writes_them():
    import torch

    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    big_k, big_v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    views = [(big_k[:, :, :5], big_v[:, :, :5])]  # a view with room after it in its storage
    kept = big_k.clone(), big_v.clone()
    for layers in ([(k, v)], views):
        cache = new_cache(layers=layers)
        before = [(a.clone(), b.clone()) for a, b in layers]
        for _ in range(3):
            keys, _ = cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), 0)
        assert keys.shape[-2] == 8 and cache.get_seq_length() == 8
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(layers, before))
        assert keys.untyped_storage().data_ptr() != layers[0][0].untyped_storage().data_ptr()
    assert torch.equal(big_k, kept[0]) and torch.equal(big_v, kept[1])


def _generate(engine, rows, cache, new_tokens):
    """model.generate on the engine's prepared inputs, with `cache` (None: transformers' default DynamicCache)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inputs = engine.prepare(rows)  # prepared anew: the features are used once
    features = [f for f in engine.features(inputs) if f is not None]
    kwargs = {k: v for k, v in inputs.items() if k != "vision"}
    if features:
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    if cache is not None:
        kwargs["cache"] = cache
    with torch.inference_mode():
        return engine.model.generate(**kwargs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     return_dict_in_generate=True, output_logits=True)


ROWS = [([make_image(seed=3)], "What is this?"), ([], "Hello there, a somewhat longer question without a page")]


@pytest.mark.parametrize("rows", [ROWS[:1], ROWS], ids=["batch1", "left-padded-batch2"])
def test_generate_is_bit_identical_to_dynamic_cache_past_the_spare_room(engine, rows):
    import torch

    new = SPARE + 12  # grows once past the first buffer's spare room
    ours = _generate(engine, rows, new_cache(engine.model.config), new)
    theirs = _generate(engine, rows, None, new)
    assert type(theirs.cache).__name__ == "DynamicCache" and len(ours.logits) == new
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))
    assert torch.equal(ours.sequences, theirs.sequences)
    layer = ours.cache.layers[0]
    assert layer._k[0].shape[-2] > layer._k[1]  # it kept spare room
    # the engine's own calls use the cache and give the same tokens
    prompt = engine.prepare(rows)["input_ids"].shape[1]
    want = [until_eos(ids, engine.eos_ids) for ids in theirs.sequences[:, prompt:].tolist()]
    assert [g.token_ids for g in engine.generate_batch(engine.prepare(rows), new)] == want
    if len(rows) == 1:
        assert engine.generate(engine.prepare(rows), new).token_ids == want[0]


def test_a_sliding_window_is_applied_as_transformers_applies_it(tiny_model):
    """Mistral's window (4096 tokens) made 8, so a short generate crosses it; spare 3 so buffers turn over. Ours keeps
    every position and the mask hides those past the window; transformers' layer keeps only the window."""
    import torch
    from transformers import AutoConfig, AutoProcessor, Idefics2ForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_model)
    config.text_config.sliding_window = 8
    model = Idefics2ForConditionalGeneration.from_pretrained(tiny_model, config=config, dtype=torch.float32,
                                                             attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(tiny_model)
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=["Hello there", "A somewhat longer question, it is, with words"], return_tensors="pt",
                       padding=True)

    def run(cache):
        extra = {} if cache is None else {"cache": cache}
        with torch.inference_mode():
            return model.generate(**inputs, **extra, do_sample=False, max_new_tokens=30, min_new_tokens=30,
                                  return_dict_in_generate=True, output_logits=True)

    ours, theirs = run(new_cache(model.config, spare=3)), run(None)
    assert type(theirs.cache.layers[0]).__name__ == "DynamicSlidingWindowLayer"
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours.logits, theirs.logits))
    assert torch.equal(ours.sequences, theirs.sequences)
    window = theirs.cache.layers[0].keys
    assert torch.equal(ours.cache.layers[0].keys[:, :, -window.shape[2]:], window)  # the same last positions


def test_a_prompt_longer_than_the_sliding_window_answers_as_the_model_card(tiny_model, tmp_path):
    """Mistral's window made 96 tokens, under one-page prompts (341 tokens and more), prefilled 128 tokens at a time
    and decoded together: the model card's greedy tokens (its layers keep the window, ours every position)."""
    import json
    import shutil

    import torch

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["sliding_window"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    engine = load_engine(ModelOptions(model=str(folder), quant="none", device="cpu", max_new_tokens=12))
    engine.prefill_chunk = 128
    rows = [([make_image(seed=4)], "Read the page."), ([make_image(seed=5)], "What is the total, and who pays it?")]
    want = []
    for row in rows:
        card = engine.build_inputs([row])
        with torch.inference_mode():
            out = engine.model.generate(**card, do_sample=False, max_new_tokens=12)[0, card["input_ids"].shape[1]:]
        want.append(until_eos(out.tolist(), engine.eos_ids))
    assert [g.token_ids for g in engine.generate_batch(engine.prepare(rows))] == want


def test_serve_prefill_from_a_prefix_twice_is_identical_and_leaves_the_prefix_unwritten(sharp_engine):
    import torch

    ids = prompt_ids(sharp_engine, [user_turn(1, "What is the total?")])
    length = prefix_length(sharp_engine, ids)
    _, kv = prefill_one(sharp_engine, ids, encode_images(sharp_engine, [make_image(seed=1)]))
    prefix = kv.head(length)
    kept = [(k.clone(), v.clone()) for k, v in prefix.layers]
    first, kv1 = prefill_one(sharp_engine, ids, prefix=prefix)
    second, kv2 = prefill_one(sharp_engine, ids, prefix=prefix)
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(kv1.layers, kv2.layers))
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(prefix.layers, kept))
    # rows decoding from it leave it unwritten too
    batch = KVBatch(sharp_engine.model)
    batch.add([kv1])
    batch.add([kv2])
    for _ in range(SPARE + 3):
        batch.step([5, 6])
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(prefix.layers, kept))


def _batch_schedule(engine, kvs):
    """Logits of every step of a KVBatch whose rows join and leave (add/keep) between steps."""
    batch, out = KVBatch(engine.model), []
    batch.add([kvs[0]])
    for step in range(40):
        if step == 3:
            batch.add([kvs[1]])
        if step == 10:
            batch.keep([1])  # the first row leaves: columns only it used are dropped
        if step == 12:
            batch.add([kvs[2]])
        if step == 20:
            batch.keep([1, 0])
        if step == 28:  # the oldest row leaves and a new one takes its slot: written in place, its columns dropped
            batch.keep([0])
            batch.add([kvs[3]])
        if step == 33:
            batch.keep([1])
        out.append(batch.step([7 + step % 5 + row for row in range(batch.rows)]))
    return out


def test_serve_batch_add_keep_and_step_equal_dynamic_cache(sharp_engine, monkeypatch):
    """The same schedule with transformers' DynamicCache in the KVBatch gives bit-identical logits."""
    import torch
    from transformers import DynamicCache

    prompts = [[user_turn(0, "Hello there")], [user_turn(0, "A much longer question about nothing at all, really")],
               [user_turn(0, "Short")], [user_turn(0, "Hi")]]
    kvs = [prefill_one(sharp_engine, prompt_ids(sharp_engine, p))[1] for p in prompts]
    held = [list(kv.layers) for kv in kvs]  # the prefilled tensors themselves: add() empties each KV's list
    kept = [[(k.clone(), v.clone()) for k, v in layers] for layers in held]
    copies = []
    monkeypatch.setattr(prefill_module, "_copied", lambda rows, width, copied=prefill_module._copied:
                        copies.append(len(rows)) or copied(rows, width))
    ours = _batch_schedule(sharp_engine, kvs)
    assert copies == [1, 2, 1, 2, 1]  # made, grown (steps 3, 12), made smaller (10, 33); step 28's join took a slot
    assert all(layer is None for kv in kvs for layer in kv.layers)  # used up, so that they can be freed
    def dynamic(rows, width):  # the same rows, padded and concatenated into transformers' own cache
        import torch.nn.functional as F

        def part(t, r, n):
            return F.pad(t[r:r + 1, :, t.shape[2] - n:], (0, 0, width - n, 0))

        cache = DynamicCache(ddp_cache_data=[(torch.cat([part(layers[i][0], r, n) for layers, r, n in rows]),
                                              torch.cat([part(layers[i][1], r, n) for layers, r, n in rows]))
                                             for i in range(len(rows[0][0]))])
        for layer in cache.layers:  # RoomLayer.drop, done by slicing
            layer.drop = lambda n, layer=layer: (setattr(layer, "keys", layer.keys[:, :, n:]),
                                                 setattr(layer, "values", layer.values[:, :, n:]))
        return cache

    monkeypatch.setattr(prefill_module, "_copied", dynamic)
    theirs = _batch_schedule(sharp_engine, [KV(list(layers), kv.length) for layers, kv in zip(held, kvs)])
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    for layers, copies in zip(held, kept):  # the prefilled rows' tensors were never written
        assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(layers, copies))
