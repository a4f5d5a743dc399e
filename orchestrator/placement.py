"""Where every trainer and engine actor runs: one placement-group bundle per device, shared or not.

A "device" is a GPU, or on a machine without GPUs a slice of `cpus_per_device` CPUs. Each
policy gets its own devices. Colocated: a policy's trainers and engines share its devices
(trainer i and engine i take half of bundle i each, by fractional GPU or CPU). Disaggregated:
the trainers' devices come first, then one bundle per engine of `engine_devices` devices (its
tp_size). Policies that share devices (`share_devices`, colocated, one-device engines): one set of
bundles for all, trainer i and engine i of every policy on bundle i, each actor on a bundle an equal
share of it. A frozen policy (served, never trained) has engines and no trainers: colocated, its engine
i takes a whole device of its own (or, sharing devices, its share of bundle i beside the others);
disaggregated, its engines' bundles only.
The same plan serves CPU and GPU; only the bundle's resource name differs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Collection, Sequence

logger = logging.getLogger(__name__)

COLOCATED_SHARE = 0.5  # of a device, for each of the trainer and the engine that share it


def _share(actors: int) -> float:
    """An equal share of a device for each of `actors` actors, rounded down to Ray's 1e-4 resource precision."""
    return math.floor(10_000 / actors) / 10_000


@dataclass(frozen=True)
class Slot:
    """One actor's place: a bundle of the placement group and the resources it takes from it."""

    bundle: int
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class PolicyPlacement:
    """The slots of one policy's trainer ranks and engines."""

    trainers: tuple[Slot, ...]
    engines: tuple[Slot, ...]


@dataclass(frozen=True)
class PlacementPlan:
    """Bundles of the placement group and each policy's slots in it."""

    bundles: tuple[dict[str, float], ...]
    policies: dict[str, PolicyPlacement]
    use_gpu: bool


def plan_placement(policies: Sequence[str], *, num_trainers: int, num_engines: int, colocate: bool,
                   use_gpu: bool, cpus_per_device: float = 1.0, train: bool = True,
                   rollout: bool = True, engine_devices: int = 1, share_devices: bool = False,
                   frozen: Collection[str] = ()) -> PlacementPlan:
    """Bundles and slots for `policies`, each with `num_trainers` trainer ranks and `num_engines` engines.

    `engine_devices` is each engine's tp_size: its actor takes that many devices of one bundle and its tp
    workers (processes it spawns) use them. `share_devices`: every policy on the same bundles (see the module
    docstring; one-device engines only). `frozen`: policies without trainers (their engines only).
    """
    if not policies:
        raise ValueError("plan_placement needs at least one policy")
    if num_trainers < 1 or num_engines < 1:
        raise ValueError(f"num_trainers={num_trainers}, num_engines={num_engines}: both must be >= 1")
    if not cpus_per_device > 0:
        raise ValueError(f"cpus_per_device={cpus_per_device}: expected a number of CPUs > 0")
    if not isinstance(engine_devices, int) or engine_devices < 1:
        raise ValueError(f"engine_devices={engine_devices!r}: expected an integer >= 1 (the engines' tp_size)")
    unknown = sorted(set(frozen) - set(policies))
    if unknown:
        raise ValueError(f"frozen policies {unknown} are not among the policies {list(policies)}")
    engines = num_engines if rollout else 0
    trainers = {name: num_trainers if train and name not in frozen else 0 for name in policies}
    shared = colocate and engines > 0 and any(trainers.values())
    if shared and engine_devices > 1:
        raise ValueError(f"colocated engines span one device, but tp_size is {engine_devices}; run engines with "
                         f"tp_size > 1 disaggregated (--no-colocate)")
    if share_devices and engine_devices > 1:
        raise ValueError(f"policies that share devices run one-device engines, but tp_size is {engine_devices}")
    bundles: list[dict[str, float]] = []
    placements: dict[str, PolicyPlacement] = {}

    def device_bundle(devices: int) -> dict[str, float]:
        cpus = float(cpus_per_device * devices)
        return {"CPU": cpus, "GPU": float(devices)} if use_gpu else {"CPU": cpus}

    def slot(index: int, share: float) -> Slot:
        return Slot(index, cpus_per_device * share, share if use_gpu else 0.0)

    if share_devices:
        devices = max([engines, *trainers.values()])
        # the actors on bundle i: trainer i of each policy that has one, engine i of each policy
        actors = [sum(i < n for n in trainers.values()) + len(policies) * (i < engines) for i in range(devices)]
        bundles.extend(device_bundle(1) for _ in range(devices))
        for name in policies:
            placements[name] = PolicyPlacement(tuple(slot(i, _share(actors[i])) for i in range(trainers[name])),
                                               tuple(slot(i, _share(actors[i])) for i in range(engines)))
        return PlacementPlan(tuple(bundles), placements, use_gpu)
    for name in policies:
        base, ranks = len(bundles), trainers[name]
        if shared and ranks:
            bundles.extend(device_bundle(1) for _ in range(max(ranks, engines)))
            trainer_slots = [slot(base + i, COLOCATED_SHARE) for i in range(ranks)]
            engine_slots = [slot(base + i, COLOCATED_SHARE) for i in range(engines)]
        else:   # disaggregated, or a policy without trainers: its engines alone on their devices
            bundles.extend(device_bundle(1) for _ in range(ranks))
            bundles.extend(device_bundle(engine_devices) for _ in range(engines))
            trainer_slots = [slot(base + i, 1.0) for i in range(ranks)]
            engine_slots = [slot(base + ranks + i, float(engine_devices)) for i in range(engines)]
        placements[name] = PolicyPlacement(tuple(trainer_slots), tuple(engine_slots))
    return PlacementPlan(tuple(bundles), placements, use_gpu)


def shared_kv_fraction(fraction: float, engines: int, position: int) -> float:
    """The share of the free device memory that the `position`-th (from 0) of `engines` engines starting one after
    another on a device gives its KV pool, so that each pool gets `fraction / engines` of the memory free before
    the first: the k-th sees about (1 - k fraction / engines) of it free. A restart starts last (engines - 1)."""
    if not 0 <= position < engines:
        raise ValueError(f"position {position} of {engines} engines")
    return fraction / (engines - position * fraction)


def create_placement_group(plan: PlacementPlan, timeout_s: float = 120.0) -> Any:
    """Reserve the plan's bundles (PACK: as few nodes as possible); a clear error if the cluster lacks them."""
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group(list(plan.bundles), strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        need: dict[str, float] = {}
        for b in plan.bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + v
        raise RuntimeError(f"the placement group of {len(plan.bundles)} bundles {list(plan.bundles)} (in all {need}) "
                           f"was not ready after {timeout_s:g}s; the cluster has {ray.cluster_resources()}. "
                           f"Lower --cpus-per-device, --actor-num-gpus-per-node or --rollout-num-engines, "
                           f"or add nodes")
    return pg


def actor_options(pg: Any, slot: Slot) -> dict[str, Any]:
    """`.options(...)` that schedule an actor into its slot of the placement group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=slot.bundle,
                placement_group_capture_child_tasks=True)}
