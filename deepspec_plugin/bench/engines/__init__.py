"""Generation engines the harness measures: one interface (``base.Engine``), several backends.

``reference`` is this project's own exact speculative sampling in torch; the others wrap
transformers, vLLM and running endpoints.
"""
