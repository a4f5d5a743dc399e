"""Worked examples built on Kiln."""
