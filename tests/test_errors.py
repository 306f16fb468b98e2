"""errors.py: an IdeficsError (and its subclasses) pickles whole, as a Ray actor's error crosses to the driver."""

from __future__ import annotations

import pickle

from idefics_cli.errors import IdeficsError, UsageError


def test_errors_pickle_with_their_code_message_hint_path_and_class():
    err = IdeficsError("model_error", "model folder '/m' does not exist", "give a hub id", "/m")
    err.param = "messages"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is IdeficsError and back.one_line() == err.one_line() and back.param == "messages"
    assert str(back) == str(err) and back.exit_status == err.exit_status
    usage = pickle.loads(pickle.dumps(UsageError("bad --pages", "e.g. 1-3")))
    assert type(usage) is UsageError and usage.one_line() == "error [usage]: bad --pages (e.g. 1-3)"
