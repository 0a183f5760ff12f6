"""Training drafts for one target (installed as ``deepspec_plugin.train``).

``data`` has the target answer prompts and stores its top-k distributions; ``trainer`` distils a
draft on them (``config``: every setting and the run identity; ``draft``: the draft as a component
the loop trains; ``batches``: split, order, collation; ``losses``); ``init`` makes the starting
draft; ``checkpoint``, ``distributed``, ``lora`` and ``on_policy`` are the trainer's other parts.
Imports the core (``deepspec_plugin.models``, ``manifest``, ``metrics``), never
``deepspec_plugin.exporters``.
"""
