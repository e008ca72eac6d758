"""Using what was trained: generation with named adapters and the OpenAI-compatible server."""
