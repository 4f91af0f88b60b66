"""The ``raptorz`` command line: argument parsing, progress display and exit codes only.

Each verb lives in its own module with ``register(subparsers)``, which adds the verb's
parser and sets ``func`` to a function ``(args) -> int`` that calls the public API.
"""
