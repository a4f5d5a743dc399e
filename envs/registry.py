"""Finding environments: by registered name, by "pkg.mod:Class" import path, or by the `kiln.envs` entry points."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from envs.base import Env
from kiln_common.plugins import import_object

ENTRY_POINT_GROUP = "kiln.envs"

_REGISTRY: dict[str, Callable[..., Env]] = {}

F = TypeVar("F", bound=Callable[..., Env])
E = TypeVar("E")


def register(name: str) -> Callable[[F], F]:
    """Class decorator: make an Env (or a factory returning one) available to `make(name)`."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"env name must be a non-empty string without ':', got {name!r}")

    def decorator(factory: F) -> F:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"env name {name!r} is already registered to {existing!r}")
        _REGISTRY[name] = factory
        if isinstance(factory, type) and issubclass(factory, Env):
            factory.env_name = name
        return factory

    return decorator


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Names `make` accepts: registered envs and the `kiln.envs` entry points of installed packages."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def resolve(name_or_path: str) -> Callable[..., Env]:
    """The Env class or factory for a registered name, an entry-point name, or a 'pkg.mod:Class' path."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"env must be a name or 'pkg.module:Name' path, got {name_or_path!r}")
    if ":" in name_or_path:
        try:
            return import_object(name_or_path)
        except ImportError as e:
            raise ValueError(f"env path {name_or_path!r}: {e}") from e
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    ep = _entry_points().get(name_or_path)
    if ep is not None:
        return ep.load()
    raise ValueError(f"unknown env {name_or_path!r}; registered: {available()}, "
                     f"or give an import path 'pkg.module:Name'")


def build(name_or_path: str, kind: type[E], kwargs: dict[str, Any]) -> E:
    """Instantiate the env `name_or_path` resolves to with `kwargs`; TypeError unless it is a `kind`."""
    factory = resolve(name_or_path)
    if not callable(factory):
        raise ValueError(f"env {name_or_path!r} resolved to {factory!r}, which is not callable")
    env = factory(**kwargs)
    if not isinstance(env, kind):
        raise TypeError(f"env {name_or_path!r} built a {type(env).__name__}, "
                        f"expected an {kind.__module__}.{kind.__qualname__}")
    if not env.env_name:
        env.env_name = name_or_path
    return env


def make(name_or_path: str, **kwargs: Any) -> Env:
    """Instantiate an env by registered name, entry-point name, or 'pkg.mod:Class' import path."""
    return build(name_or_path, Env, kwargs)
