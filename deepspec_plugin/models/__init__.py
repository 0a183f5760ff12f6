"""Models: plain Hugging Face directories (``config.json``, safetensors weights, tokenizer files).

Weights are only ever read from safetensors; pickle checkpoints are refused. Artifacts are written
into a temp directory beside the destination and renamed into place, so a crash never leaves a
half-written model behind. Heavy libraries (torch, transformers, tokenizers) are imported inside
the functions that need them, so importing this package stays cheap for the CLI and the plugin.

One module a job: ``files`` (what a model directory holds), ``tokenizer``, ``fingerprint``,
``loading`` (safetensors-only loads, pair checks), ``draft_init``, ``tiny`` (the test models) and
``reference`` (the reference target). The names below are the public API.
"""

from deepspec_plugin.models.draft_init import draft_init
from deepspec_plugin.models.files import (
    LLAMA_LIKE_MODEL_TYPES,
    TOKENIZER_FILES,
    architectures,
    copy_tokenizer_files,
    is_causal_lm,
    param_count,
    require_causal_lm,
    require_model_dir,
)
from deepspec_plugin.models.fingerprint import (
    VOLATILE_CONFIG_KEYS,
    config_and_weights_fingerprint,
    fingerprint,
)
from deepspec_plugin.models.loading import check_pair, load_causal_lm
from deepspec_plugin.models.reference import REFERENCE_NAME, reference_target, resolve_model
from deepspec_plugin.models.tiny import TinyModels, build_tiny, teacher_forced_agreement
from deepspec_plugin.models.tokenizer import (
    first_tokenizer_difference,
    id_to_token,
    load_tokenizer,
    special_tokens,
    tokenizer_fingerprint,
    tokenizer_table,
)
from deepspec_plugin.tensorfiles import PICKLE_SUFFIXES

__all__ = [
    "LLAMA_LIKE_MODEL_TYPES", "PICKLE_SUFFIXES", "REFERENCE_NAME", "TOKENIZER_FILES",
    "VOLATILE_CONFIG_KEYS", "TinyModels", "architectures", "build_tiny", "check_pair",
    "config_and_weights_fingerprint",
    "copy_tokenizer_files", "draft_init", "fingerprint", "first_tokenizer_difference",
    "id_to_token", "is_causal_lm", "load_causal_lm", "load_tokenizer", "param_count",
    "reference_target", "require_causal_lm", "require_model_dir", "resolve_model",
    "special_tokens", "teacher_forced_agreement", "tokenizer_fingerprint", "tokenizer_table",
]
