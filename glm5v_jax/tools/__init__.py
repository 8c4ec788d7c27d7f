"""Command-line tools (summary; later aot)."""
