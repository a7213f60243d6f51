"""Repository-level pytest configuration: the self-tests (tests/) drive the plugin with pytester.

What a conformance run imports is imported here, once, before any test: pytester's in-process runs
remove from sys.modules what they imported, so a module first imported inside one run would be imported
again by the next, and its classes would no longer be the ones the test file holds (a Case from one
import is no Case of the other); torch cannot be imported a second time in one process at all. The
plugin imports these only when a run is a conformance run, so without this the first in-process run of
a test file would be the one to import them."""

import hypothesis  # noqa: F401
import torch  # noqa: F401

import conformance.baselines  # noqa: F401
import conformance.checks  # noqa: F401
import conformance.fuzz_driver  # noqa: F401
import conformance.grid  # noqa: F401
import conformance.listing  # noqa: F401
import conformance.session  # noqa: F401
import conformance.summary  # noqa: F401

pytest_plugins = ["pytester"]
