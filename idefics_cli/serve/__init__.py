"""`idefics serve`: the model loaded once behind an OpenAI-compatible HTTP API (docs/serve.md).

One module per concern: config, requests (a body -> the conversation), cache (prefix key/values), pixels and
scheduler (queue, batching, streaming; the engine adapter), metrics, app (routes), server (socket, uvicorn).
Importing the package imports nothing heavy.
"""
