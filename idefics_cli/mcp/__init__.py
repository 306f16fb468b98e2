"""`idefics mcp`: local documents as tools for agent hosts over MCP (server.py alone imports the `mcp` extra)."""
