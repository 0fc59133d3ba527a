"""Reading and writing a tensor at a path inside a module's outputs or call arguments (tuples, lists, dicts)."""

from __future__ import annotations

from typing import Any, cast

from ..errors import ConfigError
from ..layers import PathElem, Site


def get_path(obj: Any, path: tuple[PathElem, ...]) -> Any:
    for p in path:
        if hasattr(obj, "to_tuple") and isinstance(p, int):  # diffusers BaseOutput
            obj = obj.to_tuple()
        obj = obj[p]
    return obj


def set_path(obj: Any, path: tuple[PathElem, ...], value: Any) -> Any:
    """Return a copy of ``obj`` with ``value`` at ``path`` (tuples rebuilt, dicts shallow-copied)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if hasattr(obj, "to_tuple") and isinstance(head, int):
        obj = obj.to_tuple()
    if isinstance(obj, tuple):
        items = list(obj)
        items[cast(int, head)] = set_path(items[cast(int, head)], rest, value)
        return tuple(items)
    if isinstance(obj, list):
        items = list(obj)
        items[cast(int, head)] = set_path(items[cast(int, head)], rest, value)
        return items
    if isinstance(obj, dict):
        new = dict(obj)
        new[head] = set_path(obj[head], rest, value)
        return new
    raise ConfigError(f"cannot write into a {type(obj).__name__} at {head!r}")


def _arg_slot(
    site: Site, args: tuple[Any, ...], kwargs: dict[str, Any], path: tuple[PathElem, ...]
) -> tuple[str, int | str]:
    head = path[0]
    if isinstance(head, int):
        return "args", head
    if head in kwargs:
        return "kwargs", head
    if site.kw_fallback is not None and len(args) > site.kw_fallback:
        return "args", site.kw_fallback
    raise ConfigError(
        f"module {site.module!r} was called without argument {head!r}; the adapter's site map does not fit this "
        "model version"
    )


def get_input(site: Site, args: tuple[Any, ...], kwargs: dict[str, Any], path: tuple[PathElem, ...]) -> Any:
    where, key = _arg_slot(site, args, kwargs, path)
    base = args[cast(int, key)] if where == "args" else kwargs[cast(str, key)]
    return get_path(base, path[1:])


def set_input(
    site: Site, args: tuple[Any, ...], kwargs: dict[str, Any], path: tuple[PathElem, ...], value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    where, key = _arg_slot(site, args, kwargs, path)
    if where == "args":
        items = list(args)
        items[cast(int, key)] = set_path(items[cast(int, key)], path[1:], value)
        return tuple(items), kwargs
    kwargs = dict(kwargs)
    kwargs[cast(str, key)] = set_path(kwargs[cast(str, key)], path[1:], value)
    return args, kwargs
