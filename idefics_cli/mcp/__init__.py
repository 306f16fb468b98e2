"""`idefics mcp`: local documents as tools for agent hosts, over the Model Context Protocol (server.py).

Contract: server.py alone imports the `mcp` package (the `[mcp]` extra); importing this package imports nothing.
It reads documents (documents/) and answers through the library's `Model` (library.py), handed in by the command.
"""
