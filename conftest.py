"""Repository-level pytest configuration: the self-tests (tests/) drive the plugin with pytester.

torch is imported here, once, before any test: pytester's in-process runs remove from sys.modules what
they imported, and torch cannot be imported a second time in one process (the plugin no longer imports
it at load, so the first in-process run of a test file that does not import torch would otherwise be
the one to import it)."""

import torch  # noqa: F401

pytest_plugins = ["pytester"]
