"""engine.py and runtime/kvcache.py's prefill: chunked prefill of long prompts, on the sharpened tiny Idefics2."""

from __future__ import annotations

import pytest
from conftest import make_image


@pytest.fixture(scope="module")
def sharp_engine(sharp_model):
    from idefics_cli.runtime.model import ModelOptions, load_engine

    return load_engine(ModelOptions(model=sharp_model, quant="none", device="cpu", max_new_tokens=12))


def _prefill_lengths(engine, run):
    """The sequence length of every forward call while `run()` generates (the prefill's calls come first)."""
    lengths = []
    forward = engine.model.forward

    def counting(*args, **kwargs):
        ids = kwargs.get("input_ids")
        ids = kwargs.get("inputs_embeds") if ids is None else ids  # a prefill is fed merged embeddings
        lengths.append(None if ids is None else ids.shape[1])
        return forward(*args, **kwargs)

    engine.model.forward = counting
    try:
        result = run()
    finally:
        del engine.model.forward  # the class's method again
    return lengths, result


def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_greedy_answer(sharp_engine):
    engine = sharp_engine
    pages = [make_image(300 + 20 * k, 400, seed=k) for k in range(4)]  # 4 pages x 320 image tokens
    question = "What is the total on these pages?"

    def answer():
        return engine.generate(engine.prepare([(pages, question)]))

    old = engine.prefill_chunk
    try:
        engine.prefill_chunk = 0  # off: the whole prompt in one call
        whole_len, whole = _prefill_lengths(engine, answer)
        prompt = whole_len[0]
        assert prompt > 4 * 320
        engine.prefill_chunk = 512
        chunked_len, chunked = _prefill_lengths(engine, answer)
        batched_len, batched = _prefill_lengths(engine, lambda: engine.generate_batch(
            engine.prepare([(pages, question)]))[0])
    finally:
        engine.prefill_chunk = old
    n_chunks = -(-prompt // 512)
    assert chunked_len[:n_chunks] == [512] * (n_chunks - 1) + [prompt - 512 * (n_chunks - 1)]
    assert batched_len[:n_chunks] == chunked_len[:n_chunks]
    assert whole.token_ids and chunked.token_ids == whole.token_ids and batched.token_ids == whole.token_ids


def test_a_page_is_prefilled_whole(engine):
    """One page (about 350 tokens) stays under the default chunk: the prefill is one call, as before."""
    lengths, gen = _prefill_lengths(engine, lambda: engine.generate(
        engine.prepare([([make_image()], "What is this?")])))
    assert engine.prefill_chunk == 1024 and 320 < lengths[0] < 1024 and gen.completion_tokens > 0


def test_a_question_holding_the_image_token_is_a_usage_error(engine):
    """`ask scan.png "What is <image> here?"` was a generation_error (exit 5: one more image placeholder than
    images); the question is refused up front as usage (exit 2), for `chat` turns too."""
    from idefics_cli.errors import UsageError
    from idefics_cli.interface import user_turn

    with pytest.raises(UsageError, match="<image>"):
        engine.prepare([([make_image()], "What is <image> here?")])
    with pytest.raises(UsageError, match="<image>"):
        engine.chat_inputs([user_turn(1, "What?"), {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
                            user_turn(0, "and <image>?")], [make_image()], 4)
    assert engine.prompt(1, "What is <img> here?").count("<image>") == 1
