"""Recipes: whole jobs composed from the core, ``train`` and ``exporters``, read top to bottom."""
