"""The real load of EAGLE-3 heads in vLLM: greedy decoding with each head and without any.

Runs on the project's one vLLM runner, :class:`deepspec_plugin.bench.engines.vllm_offline.
VLLMOfflineEngine` with ``method="eagle3"``: one worker process for the whole run, the plain
target first, then each head in turn (``set_draft``). No reference engine runs EAGLE-3, so the
check of an export (:func:`vllm_load_eagle3`, ``dspec export check``) is that vLLM builds the head,
drafts with it and leaves greedy output unchanged; acceptance is reported, not judged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepspec_plugin.bench.engines.base import GenerationConfig
from deepspec_plugin.bench.engines.vllm_failure import VLLMEngineError
from deepspec_plugin.errors import DspecError

LOAD_START_S = 240  # one LLM start on a busy CPU takes about a minute; room for a slow machine
HEAD_FIX = "a head vLLM cannot build fails here with vLLM's reason: fix the head or its target"


def eagle3_prompt_ids(target: str | Path, num_prompts: int) -> list[list[int]]:
    """The first user turns of the packaged mt-bench prompts as token ids (through the target's
    chat template where its tokenizer has one)."""
    from deepspec_plugin.bench.prompts import format_turns, has_chat_template, load_prompt_file
    from deepspec_plugin.bench.spec import PROMPTS_DIR
    from deepspec_plugin.models import load_tokenizer

    tok = load_tokenizer(Path(target))
    turns = load_prompt_file(PROMPTS_DIR / "mt-bench.jsonl")[:num_prompts]
    return [format_turns(tok, t[:1], [], has_chat_template(tok)) for t in turns]


def run_vllm_eagle3(target: str | Path, heads: list[str | Path], prompts: list[list[int]],
                    k: int, max_new_tokens: int, *, plain: bool = True,
                    timeout_s: float | None = None) -> dict[str, Any]:
    """Greedy generation in vLLM's offline LLM: the target alone (``plain``), then with each
    EAGLE-3 head in turn, all prompts in one batch each time.

    Returns ``{"vllm": version, "plain": token ids per prompt or None, "heads": {str(head):
    {"tokens", "counts": num_drafts, num_draft_tokens, num_accepted_tokens,
    accepted_per_position}}, "log": vLLM's log}``; the counts are the delta of vLLM's own
    spec-decode counters over the head's batch. Raises DspecError with vLLM's reason where vLLM
    fails, or where one batch (its engine start included) runs past ``timeout_s``.
    """
    from deepspec_plugin.bench.engines.vllm_offline import VLLMOfflineEngine

    target = Path(target)
    heads = [Path(h) for h in heads]
    if not heads and not plain:
        raise DspecError("nothing to run: no head and no plain decoding", "pass a head")
    need = max(len(p) for p in prompts) + max_new_tokens + k + 16
    engine = VLLMOfflineEngine(target, heads[0] if heads else None, method="eagle3",
                               max_model_len=max(256, need),
                               request_timeout_s=timeout_s or 120 + LOAD_START_S)
    greedy = GenerationConfig(max_new_tokens=int(max_new_tokens))
    result: dict[str, Any] = {"vllm": None, "plain": None, "heads": {}}
    try:
        if plain:
            result["plain"] = _tokens(engine.generate(prompts, greedy))
        for head in heads:
            engine.set_draft(head, "eagle3")
            batch = engine.generate(prompts, GenerationConfig(max_new_tokens=int(max_new_tokens),
                                                              k=int(k)))
            counts = engine.last_metric_counts or batch.counts
            result["heads"][str(head)] = {"tokens": _tokens(batch), "counts": counts.to_dict()}
        result["vllm"] = engine.describe().get("vllm")
        result["log"] = engine.log_text()
    except VLLMEngineError as e:
        names = ", ".join(map(str, heads)) or "no head"
        raise e.replaced(context=f"loading or running the EAGLE-3 head ({names}) with the "
                                 f"target {target}", fix=HEAD_FIX) from None
    finally:
        engine.close()
    return result


def _tokens(batch) -> list[list[int]]:
    return [list(g.token_ids) for g in batch.generations]


def vllm_load_eagle3(export_dir: Path, target: Path, k: int, *, num_prompts: int = 2,
                     max_new_tokens: int = 16) -> dict[str, Any]:
    """Load an EAGLE-3 export in vLLM with its target and decode greedily with it and without it.

    Returns ``{"equal": speculative tokens == plain tokens for every prompt, "counts":
    {"num_drafts", "num_draft_tokens", "num_accepted_tokens"} (vLLM's metrics), "summary": one
    line}``.
    """
    export_dir, target = Path(export_dir), Path(target)
    prompts = eagle3_prompt_ids(target, num_prompts)
    result = run_vllm_eagle3(target, [export_dir], prompts, k, max_new_tokens)
    run = result["heads"][str(export_dir)]
    counts = {key: int(run["counts"][key])
              for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    differ = [i for i, (a, b) in enumerate(zip(run["tokens"], result["plain"])) if a != b]
    equal = not differ and len(run["tokens"]) == len(result["plain"])
    summary = (f"vLLM {result['vllm']} loaded the EAGLE-3 head: "
               f"{counts['num_accepted_tokens']}/{counts['num_draft_tokens']} draft tokens "
               f"accepted over {counts['num_drafts']} drafts (k={k}, {len(prompts)} prompts, "
               "greedy); ")
    summary += ("output identical to plain decoding" if equal else
                f"output differs from plain decoding on prompt(s) {differ}: speculation changed "
                "greedy tokens, so vLLM ran the head or its verification wrongly")
    return {"equal": equal, "counts": counts, "summary": summary}
