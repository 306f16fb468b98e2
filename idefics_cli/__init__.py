"""idefics-cli: ask documents questions and transcribe them with Idefics2-8B, locally, 4-bit."""

__version__ = "0.1.0"
