"""A running `idefics serve` as an engine: the client and its HTTP."""
