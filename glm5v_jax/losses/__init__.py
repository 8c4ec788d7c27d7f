"""Losses: next-token cross-entropy with MTP terms."""
