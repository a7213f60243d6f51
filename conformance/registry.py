"""Names to backends: the built-in ones, those third-party packages register, and import strings.

- built-in: the table below, one module per backend, each defining ``BACKEND``;
- entry points in the group ``attention_conformance.backends``: the name is the backend's name, the
  object a ``Backend`` or a function in flash-attn's convention;
- ``path/to/file.py:function`` or ``package.module:function``: a user's function, with no
  registration code. It is assumed to support what ``flash_attn_func`` does (``Capabilities()``'s
  defaults), narrowed or widened by a dict attribute ``conformance_capabilities`` on the function;
  ``conformance_compiled = True`` on it says it compiles per variant (``Backend.compiled``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from conformance.backend import Backend
from conformance.capabilities import Capabilities

BUILTIN = {
    "naive": "conformance.backends.naive",
    "sdpa-math": "conformance.backends.sdpa_math",
    "tiled": "conformance.backends.tiled",
    "sdpa-flash": "conformance.backends.sdpa_flash",
    "sdpa-efficient": "conformance.backends.sdpa_efficient",
    "sdpa-cudnn": "conformance.backends.sdpa_cudnn",
    "flex": "conformance.backends.flex",
    "flash": "conformance.backends.flash",
    "flash3": "conformance.backends.flash3",
    "flash4": "conformance.backends.flash4",
    "xformers": "conformance.backends.xformers",
}
ENTRY_POINT_GROUP = "attention_conformance.backends"
CAPABILITIES_ATTRIBUTE = "conformance_capabilities"
COMPILED_ATTRIBUTE = "conformance_compiled"


class BackendNotFound(Exception):
    """A --backend value that names nothing loadable; the message says what and lists the known names."""


def _registered() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_names() -> list[str]:
    return [*BUILTIN, *sorted(set(_registered()) - set(BUILTIN))]


def from_function(fn, name: str) -> Backend:
    """A Backend for a plain function, declared by its ``conformance_capabilities`` dict if it has one, and
    compiled per variant if its ``conformance_compiled`` says so (a torch.compile'd or Triton kernel: its
    fuzz tests then draw the grid's variants, each of which it compiles anyway)."""
    if not callable(fn):
        raise BackendNotFound(f"{name!r} is a {type(fn).__name__}, not a callable")
    declared = getattr(fn, CAPABILITIES_ATTRIBUTE, None) or {}
    if not isinstance(declared, dict):
        raise BackendNotFound(f"{name}: {CAPABILITIES_ATTRIBUTE} must be a dict, not {type(declared).__name__}")
    try:
        capabilities = Capabilities().updated(declared)
    except (TypeError, ValueError) as exc:
        raise BackendNotFound(f"{name}: invalid {CAPABILITIES_ATTRIBUTE}: {exc}") from None
    compiled = getattr(fn, COMPILED_ATTRIBUTE, False)
    if not isinstance(compiled, bool):
        raise BackendNotFound(f"{name}: {COMPILED_ATTRIBUTE} must be True or False, not {compiled!r}")
    return Backend(name=name, fn=fn, capabilities=capabilities, description=(fn.__doc__ or "").strip().split("\n")[0],
                   may_refuse=False, compiled=compiled)


def _import_string(spec: str):
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise BackendNotFound(f"import string {spec!r} must look like path/to/file.py:function or package.module:function")
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            if not path.is_file():
                raise BackendNotFound(f"cannot import {spec!r}: no file {target}")
            sys.path.insert(0, str(path.parent))  # let the kernel file import its neighbours
            module_spec = importlib.util.spec_from_file_location(f"conformance_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module  # dataclasses and pickling look modules up here
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # `pytest` puts no folder on sys.path: my_kernels:fn from its own folder
                sys.path.append(os.getcwd())
            module = importlib.import_module(target)
    except BackendNotFound:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's module failing to import is a usage error
        raise BackendNotFound(f"cannot import {spec!r}: {type(exc).__name__}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise BackendNotFound(f"cannot import {spec!r}: module {target!r} has no attribute {attr!r}") from None


def load(spec: str) -> Backend:
    """The backend a --backend value names."""
    if spec in BUILTIN:
        return importlib.import_module(BUILTIN[spec]).BACKEND
    registered = _registered()
    if spec in registered and ":" not in spec:  # an installed package cannot take over an import string
        obj = registered[spec].load()
        # the entry point's name is the backend's name, whatever the object calls itself: the kernel's
        # process loads it by this name again, and the rerun lines print it
        return dataclasses.replace(obj, name=spec) if isinstance(obj, Backend) else from_function(obj, spec)
    if ":" in spec:
        return from_function(_import_string(spec), spec)
    close = difflib.get_close_matches(spec, known_names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise BackendNotFound(f"unknown backend {spec!r}.{hint} Known backends: {', '.join(known_names())}; "
                          "or give an import string: path/to/file.py:function or package.module:function")
