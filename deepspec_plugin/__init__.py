"""deepspec-plugin: train, measure, export and monitor speculative-decoding drafts.

The package is a library first; ``dspec`` (``deepspec_plugin.cli``) is a thin layer on top.
Heavy dependencies (torch, transformers, vllm) are imported lazily by the modules that need them,
so the serving side stays small.
"""

__version__ = "0.1.0"
