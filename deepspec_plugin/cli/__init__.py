"""`dspec`, the command line: the top layer, over the core, ``train`` and ``exporters``."""

from deepspec_plugin.cli.app import app, main

__all__ = ["app", "main"]
