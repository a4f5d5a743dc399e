"""Kiln's neutral layer: the contracts and small helpers that several packages share and none owns.

`Sample` (the trajectory every part speaks), model families and the HF config reader, plugin
loading, `to_device` and `free_port`. It imports nothing of Kiln's; everything may import it.
"""
