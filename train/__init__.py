"""Training drafts for one target (installed as ``deepspec_plugin.train``).

``data`` has the target answer prompts and stores its top-k distributions; ``trainer`` distils a
draft on them with the ``losses``; ``init`` makes the starting draft; ``checkpoint``,
``distributed``, ``lora`` and ``on_policy`` are the trainer's components. Imports the core
(``deepspec_plugin.models``, ``manifest``, ``metrics``), never ``deepspec_plugin.exporters``.
"""
