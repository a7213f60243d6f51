"""attention-conformance: is an attention kernel the same function as softmax(QK^T * scale + mask) V?

The names below are what a third-party package needs to declare a backend. They are imported when
first used: the pytest plugin (conformance.plugin) loads this package in every pytest run of an
environment where it is installed, and must not import torch there.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["Backend", "Capabilities", "Case", "Unsupported", "__version__"]

_LAZY = {"Backend": "conformance.backend", "Unsupported": "conformance.backend",
         "Capabilities": "conformance.capabilities", "Case": "conformance.case"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'conformance' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
