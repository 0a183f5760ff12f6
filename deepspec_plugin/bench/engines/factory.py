"""One place that turns an engine name into an Engine; each backend is imported only when chosen."""

from __future__ import annotations

from pathlib import Path

from deepspec_plugin.bench.engines.base import Engine
from deepspec_plugin.errors import DspecError

ENGINES = ("reference", "hf", "vllm", "endpoint")


def _need_target(name: str, target: Path | None) -> Path:
    if target is None:
        raise DspecError(f"the {name} engine needs a target model", "pass --target DIR")
    return Path(target)


def make_engine(
    name: str,
    *,
    target: Path | None,
    draft: Path | None,
    device: str = "cpu",
    dtype: str = "float32",
    endpoint: str | None = None,
    speculate: int | None = None,
    tokenizer=None,
    draft_sample_method: str = "probabilistic",
) -> Engine:
    """The engine called ``name``, loaded and ready to generate.

    ``tokenizer`` (a tokenizer, or a model directory to load it from) is used by the endpoint
    engine only, to send text to servers that take text (TGI).
    """
    if name == "reference":
        from deepspec_plugin.bench.engines.reference import ReferenceEngine

        return ReferenceEngine.from_paths(
            _need_target(name, target), draft, device=device, dtype=dtype,
            draft_sample_method=draft_sample_method,
        )
    if name == "hf":
        from deepspec_plugin.bench.engines.hf import HFAssistedEngine

        return HFAssistedEngine.from_paths(
            _need_target(name, target), draft, device=device, dtype=dtype
        )
    if name == "vllm":
        from deepspec_plugin.bench.engines.vllm_offline import VLLMOfflineEngine, require_vllm
        from deepspec_plugin.models.files import head_draft_kind, is_eagle3_dir

        require_vllm()
        method = "draft_model"
        if draft is not None and is_eagle3_dir(draft):
            method = "eagle3"
        elif draft is not None and head_draft_kind(draft) is not None:
            method = head_draft_kind(draft)
        return VLLMOfflineEngine(_need_target(name, target), draft, dtype=dtype, method=method,
                                 draft_sample_method=draft_sample_method)
    if name == "endpoint":
        from deepspec_plugin.bench.engines.endpoint import EndpointEngine

        if not endpoint:
            raise DspecError(
                "the endpoint engine needs a server URL",
                "pass --endpoint URL (e.g. http://127.0.0.1:8000)",
            )
        if isinstance(tokenizer, (str, Path)):
            from deepspec_plugin.models import load_tokenizer

            tokenizer = load_tokenizer(Path(tokenizer))
        return EndpointEngine(endpoint, speculate=speculate, tokenizer=tokenizer)
    raise DspecError(f"unknown engine {name!r}", f"choose one of {', '.join(ENGINES)}")
