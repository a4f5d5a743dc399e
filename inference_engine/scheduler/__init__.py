"""The engine's scheduler: which requests run each step, the step's tensors, and what comes back.

`scheduler.py` drives the steps and the overlap (launch step k+1, then read step k); `admission.py`
picks each step's requests and token counts (running first, then the queue; prefix-sharing deferral;
retraction); `kv.py` keeps each request's KV slots and its prefix in the radix cache; `batch.py` builds
a step's ForwardBatch and SamplingBatch; `output.py` brings the sampled tokens back to their requests
(log-probs, stop checks, streaming).
"""

from inference_engine.scheduler.scheduler import Scheduler

__all__ = ["Scheduler"]
