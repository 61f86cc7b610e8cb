"""`qwen3-mlx serve`: an OpenAI-compatible HTTP server (a room of its own: nothing below imports it)."""
