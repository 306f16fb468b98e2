"""cli/__init__.py: the process-level setup done before any command runs."""

import sys

import pytest

from idefics_cli.cli import one_malloc_arena


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_one_malloc_arena_is_accepted_by_glibc():
    assert one_malloc_arena() is True
