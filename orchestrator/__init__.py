"""Kiln's orchestrator: the driver and its step loop, the CLI and config resolution, placement, and the
Ray actors (engines, the rollout manager, trainer groups). `train.py` calls `orchestrator.driver.main`.

It is the only package that sees every other one (docs/design.md has the rules).
"""
