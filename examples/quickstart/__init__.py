"""Quickstart task: single-digit arithmetic ("What is 3 + 4?" -> "7"), small enough for a tiny model on CPU."""
