"""Drafts into what vLLM and TGI load (installed as ``deepspec_plugin.exporters``).

``vllm`` (draft_model and EAGLE-3 via ``eagle3``) and ``tgi`` (Medusa and MLP-speculator heads,
``heads``, with the loader's rules in ``tgi_rules``) write a checked export directory with its
``serving`` configs; ``check`` re-runs every rule on an export; ``hub`` pushes one with a model
card. Imports the core, never ``deepspec_plugin.train``.
"""
