"""The runtime: everything that runs the model (torch and transformers live below here)."""
