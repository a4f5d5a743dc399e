"""Kiln RL rollout: samples, data, generate functions, rewards, the rollout manager and router."""
