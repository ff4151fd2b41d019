"""The class swap every Skip-Vision patch uses (as ToMe's ``make_tome_class``): an existing object (a decoder layer,
a cache, a processor) gets a generated subclass of its own class with a mixin first. Its state dict, its HF class
name and its module stay, so checkpoints, ``isinstance`` checks and saved configs see the HF class; :func:`unmix`
takes the mixin off again.
"""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


@cache
def _mixed_class(mixin: type, base: type, attrs: tuple[tuple[str, Any], ...]) -> type:
    return type(base.__name__, (mixin, base), {"__module__": base.__module__, **dict(attrs)})


def mixed_class(mixin: type, base: type, **attrs: Any) -> type:
    """``mixin`` + ``base`` under ``base``'s name and module, with class attributes ``attrs`` (hashable values); one
    class per combination, so ``type(a) is type(b)`` holds for two objects mixed alike."""
    return _mixed_class(mixin, base, tuple(sorted(attrs.items())))


def base_class(obj: Any, mixin: type) -> type:
    """The class ``obj`` (an object or a class) had before ``mixin`` was mixed into it (its own when not mixed)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return cls.__bases__[1] if cls.__bases__[:1] == (mixin,) else cls


def mix_into(obj: T, mixin: type, **attrs: Any) -> T:
    """Swap ``obj``'s class for ``mixin`` + its class (the HF class underneath, if ``obj`` was mixed with ``mixin``
    before), in place; returns ``obj``."""
    obj.__class__ = mixed_class(mixin, base_class(obj, mixin), **attrs)
    return obj


def unmix(obj: T, mixin: type) -> T:
    """Take ``mixin`` off ``obj``'s class again, in place (nothing to do when it was not mixed in); returns ``obj``."""
    obj.__class__ = base_class(obj, mixin)
    return obj
