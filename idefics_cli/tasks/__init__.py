"""The tasks over an engine: ask, chat, transcribe, and their records."""
