"""The conformance suite itself: one test per check, parametrized over backend x case by the plugin.

Run it from a checkout with ``pytest --backend=NAME``, or from anywhere the package is installed with
``pytest --pyargs conformance.suite --backend=NAME``.
"""
