"""One source of truth for the harness's options (as peft's configs): a settings dataclass declares each field with
:func:`option`, which carries its help text and how the command line spells it; :func:`add_options` builds the
argparse arguments from the fields and :func:`options_from` reads them back, so no option is written twice.

The argparse ``type`` checkers live here too, so a zero batch or a negative count is refused by the option's name
before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` for whole numbers >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


#: the smallest image side the harness takes: below it a vision tower has no patches to speak of
MIN_IMAGE_SIZE = 16

positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    negate: bool = False,
    **argparse_options: Any,
) -> Any:
    """A dataclass field that is also a command-line option.

    ``flag``: its spelling (default ``--field-name``); ``negate``: a ``True`` default turned off by ``flag`` (as
    ``--train-vision-tower`` for ``freeze_vision_tower``); ``argparse_options``: ``type``, ``nargs``, ``choices``...
    A tuple default is given on the command line as a list (``nargs="+"``) and read back as a tuple.
    """
    metadata = {"help": help, "flag": flag, "negate": negate, "argparse": argparse_options}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _options(cls: type, names: Iterable[str] | None) -> list[dataclasses.Field]:
    chosen = None if names is None else set(names)
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata and (chosen is None or f.name in chosen)]


def flag(cls: type, name: str) -> str:
    """How the command line spells field ``name`` of ``cls`` (for messages)."""
    metadata = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    spelled = metadata.get("flag") or "--" + name.replace("_", "-")
    return f"{spelled} (off)" if metadata.get("negate") else spelled


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    names: Iterable[str] | None = None,
    **defaults: Any,
) -> None:
    """Add ``cls``'s option fields (all, or ``names``) to ``parser``; ``defaults`` override a field's default for
    this command."""
    for f in _options(cls, names):
        spelled = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        kwargs = {"dest": f.name, "help": f.metadata["help"], **f.metadata["argparse"]}
        default = defaults.get(f.name, f.default)
        if f.metadata["negate"]:
            kwargs.update(action="store_false", default=True)
        elif default is False:
            kwargs.update(action="store_true", default=False)
        elif default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            default = f.default_factory() if default is dataclasses.MISSING else default
            kwargs["default"] = list(default) if isinstance(default, tuple) else default
        if "action" not in kwargs and "choices" not in kwargs:
            kwargs.setdefault("metavar", spelled.lstrip("-").replace("-", "_").upper())  # --lr LR, not LEARNING_RATE
        parser.add_argument(spelled, **kwargs)


def options_from(cls: type, args: argparse.Namespace, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The values of ``cls``'s option fields in parsed ``args``, as keyword arguments of ``cls``."""
    values = {}
    for f in _options(cls, names):
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) and isinstance(f.default, tuple) else value
    return values


def torch_device(text: str) -> str:
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:1, ...)") from None
    return text
