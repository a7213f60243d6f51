"""Repository-level pytest configuration: the self-tests (tests/) drive the plugin with pytester."""

pytest_plugins = ["pytester"]
