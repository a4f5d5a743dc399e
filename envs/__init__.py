"""Kiln environments: the agent-environment plugin API and built-in environments."""
