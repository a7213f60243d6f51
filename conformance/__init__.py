"""attention-conformance: is an attention kernel the same function as softmax(QK^T * scale + mask) V?

The names below are what a third-party package needs to declare a backend.
"""

from conformance.backend import Backend, Unsupported
from conformance.capabilities import Capabilities
from conformance.case import Case

__version__ = "0.1.0"
__all__ = ["Backend", "Capabilities", "Case", "Unsupported", "__version__"]
