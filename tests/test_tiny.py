"""tiny.py: the bundled tokenizer is Mistral-7B-v0.1's, and a missing reader package fails in one line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from idefics_cli.dev.tiny import TOKENIZER_FILE, TOKENIZER_SHA256

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bundled_tokenizer_is_mistral_v1_and_tokenizes_like_idefics2(engine):
    with open(TOKENIZER_FILE, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == TOKENIZER_SHA256
    ids = engine.processor.tokenizer("Hello <image> world<end_of_utterance>").input_ids
    assert ids == [1, 22557, 28705, 32001, 1526, 32002]  # Mistral's ids for Hello / world, idefics2's added tokens


def test_missing_sentencepiece_or_protobuf_is_one_line_naming_the_extra(tmp_path):
    for blocked, named in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")):
        code = (f"import sys; sys.modules[{blocked!r}] = None\n"
                f"from idefics_cli.dev.tiny import main; main([{str(tmp_path)!r}])")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": ROOT})
        assert result.returncode == 1
        assert result.stderr.strip() == (f"error: the tiny model's tokenizer needs {named}: "
                                         "pip install 'idefics-cli[tiny]'")
        assert not os.listdir(tmp_path)  # failed before writing anything
