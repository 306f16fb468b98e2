"""`idefics serve`: the model loaded once behind an OpenAI-compatible HTTP API.

Contract: one module per concern, each with its own contract: config.py (settings, refusing unsafe ones),
requests.py (an OpenAI chat body -> the conversation and its pages), backend.py (the one adapter to the
engine/model), cache.py (the prefix key/value cache), scheduler.py (queue, batching, streaming tokens),
app.py (the ASGI routes, errors, access log), server.py (socket, uvicorn, graceful end). Importing this package
imports nothing heavy; FastAPI and uvicorn are imported by app.py and server.py only.
"""
