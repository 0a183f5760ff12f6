"""transformers assisted generation: the peer engine the harness compares against.

``target.generate(input_ids, assistant_model=draft)`` with a constant k: the assistant's
``num_assistant_tokens`` is k, its schedule ``"constant"`` and its confidence-threshold early stop
off (``assistant_confidence_threshold=0``), so every draft proposes k tokens except where the length
limit caps it (transformers drafts at most ``max_length - cur_len - 1`` tokens) or the draft itself
emits a stop token. Sampling uses transformers' own speculative sampling (Leviathan et al.) on the
full distribution (top_k=0, top_p=1).

transformers reports no acceptance counts, so they are derived exactly from the target's forward
passes. In assisted decoding each target forward verifies one candidate set: a pre-hook records
the cache length before it (``past``) and its input ids. The sequence before step j has length
``cur_j`` (the prompt length for the first step; afterwards ``past + 1``, because the cache keeps
everything but the last emitted token), so the step drafted ``past + n_input - cur_j`` tokens, the
tail of its input. Accepted = the longest prefix of those candidates that the final sequence
contains at the same positions. The derivation is checked against the final sequence: each step
grows the sequence by accepted + 1 (the corrected or bonus token), except a last step whose accepted
tokens end with a stop token (transformers cuts the bonus after it). A step with no candidates
(one token left before max_new_tokens) is a plain target step, not a draft.

Identity, per request: new tokens = accepted + drafts + plain steps - (1 if the request ended on
an accepted drafted stop token else 0).

transformers' assisted generation supports batch size 1 only, so a batch runs one prompt after
another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from deepspec_plugin.bench.engines.base import BatchResult, Engine, Generation, GenerationConfig
from deepspec_plugin.bench.engines.timing import StepTimer
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts

_CHANGED = "transformers' assisted decoding changed; counts cannot be derived"


@dataclass
class _Verification:
    past_len: int  # target cache length before the forward
    input_ids: list[int]  # tokens fed to the target in this forward


@dataclass
class DerivedCounts:
    counts: SpecCounts
    plain_steps: int  # target steps without candidates (length cap left no room to draft)
    ended_on_accepted_stop: bool  # the last step accepted a drafted stop token: no bonus token


def derive_counts(
    prompt_len: int,
    verifications: list[_Verification],
    sequence: list[int],
    stop_token_ids: tuple[int, ...] | list[int],
) -> DerivedCounts:
    """Acceptance counts of one assisted-generation request from its target forwards.

    ``sequence`` is the final sequence, prompt included. Raises RuntimeError when the recorded
    forwards do not explain the sequence (transformers' assisted decoding changed).
    """
    counts = SpecCounts()
    plain_steps = 0
    ended_on_stop = False
    stops = set(stop_token_ids)
    cur_len = prompt_len
    for j, v in enumerate(verifications):
        if j > 0:
            cur_len = v.past_len + 1
        n_in = len(v.input_ids)
        drafted = v.past_len + n_in - cur_len
        next_len = (
            verifications[j + 1].past_len + 1 if j + 1 < len(verifications) else len(sequence)
        )
        growth = next_len - cur_len
        if drafted < 0 or growth < 1:
            raise RuntimeError(
                f"assisted-generation step {j} does not fit the sequence (drafted {drafted}, "
                f"growth {growth}): {_CHANGED}"
            )
        candidates = v.input_ids[n_in - drafted :]
        accepted = 0
        while (
            accepted < drafted
            and cur_len + accepted < len(sequence)
            and candidates[accepted] == sequence[cur_len + accepted]
        ):
            accepted += 1
        last = j + 1 == len(verifications)
        stop_cut = (
            last
            and accepted > 0
            and accepted == growth
            and sequence[cur_len + accepted - 1] in stops
        )
        if growth != accepted + 1 and not stop_cut:
            raise RuntimeError(
                f"assisted-generation step {j} grew the sequence by {growth} tokens after "
                f"accepting {accepted} of {drafted}: {_CHANGED}"
            )
        if drafted == 0:
            plain_steps += 1
        else:
            counts.record_draft(drafted, accepted)
        ended_on_stop = stop_cut
    if not verifications and len(sequence) > prompt_len:
        raise RuntimeError("assisted generation produced tokens without any target forward")
    return DerivedCounts(
        counts=counts, plain_steps=plain_steps, ended_on_accepted_stop=ended_on_stop
    )


class HFAssistedEngine(Engine):
    """Target and draft as transformers models; assisted generation with a constant k."""

    name = "hf"
    per_request_counts = True

    def __init__(self, target_model, draft_model=None, device: str = "cpu"):
        self.target = target_model
        self.draft = draft_model
        self.device = str(device)
        self.dtype = str(next(target_model.parameters()).dtype).removeprefix("torch.")
        self._sync = self.device.startswith("cuda")
        # Per-request derivation details of the last speculative batch (plain steps, stop cut).
        self.last_derivations: list[DerivedCounts] = []

    @classmethod
    def from_paths(
        cls, target: Path, draft: Path | None = None, device: str = "cpu", dtype: str = "float32"
    ) -> HFAssistedEngine:
        """Load both models (safetensors only); without a draft the engine only decodes plainly."""
        from deepspec_plugin.models import check_pair, load_causal_lm

        if draft is not None:
            check_pair(Path(target), Path(draft))
        engine = cls(
            load_causal_lm(Path(target), device=device, dtype=dtype),
            load_causal_lm(Path(draft), device=device, dtype=dtype) if draft is not None else None,
            device=device,
        )
        return engine

    # --- generation ------------------------------------------------------------------------

    def _generation_config(self, cfg: GenerationConfig):
        from transformers import GenerationConfig as HFGenerationConfig

        stops = list(cfg.stop_token_ids)
        sampling = cfg.temperature > 0
        extra = {"temperature": cfg.temperature, "top_k": 0, "top_p": 1.0} if sampling else {}
        # An empty eos list (not None) keeps transformers from falling back to the model's eos ids:
        # a request stops at exactly cfg.stop_token_ids, as in every engine.
        return HFGenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=0,
            do_sample=sampling,
            eos_token_id=stops,
            pad_token_id=stops[0] if stops else 0,
            num_beams=1,
            **extra,
        )

    def _configure_assistant(self, k: int) -> None:
        gc = self.draft.generation_config
        gc.num_assistant_tokens = int(k)
        gc.num_assistant_tokens_schedule = "constant"
        gc.assistant_confidence_threshold = 0.0  # 0 disables the early stop (None means 0.4)

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> BatchResult:
        import torch

        if cfg.k is not None and cfg.k < 1:
            raise DspecError(f"k is {cfg.k}", "use k >= 1, or no k for plain decoding")
        if cfg.k is not None and self.draft is None:
            raise DspecError(
                "speculative decoding asked of an hf engine without a draft", "pass a draft model"
            )
        if not prompts or any(len(p) == 0 for p in prompts):
            raise DspecError("an empty batch or an empty prompt", "give every request >= 1 token")
        gen_config = self._generation_config(cfg)
        speculating = cfg.k is not None
        if speculating:
            self._configure_assistant(cfg.k)

        # With k=1 transformers feeds the draft two tokens every round (it re-feeds the last token
        # it already saw): where there are no single-token forwards, two-token ones (about the
        # same cost) give the step time.
        draft_timer = StepTimer(self.device, widths=(1, 2))
        target_timer = StepTimer(self.device, widths=(1, 2))
        verifications: list[_Verification] = []

        def record_verification(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            verifications.append(_Verification(int(past), ids[0].tolist()))

        handles = []
        if speculating:
            handles.append(
                self.target.register_forward_pre_hook(record_verification, with_kwargs=True)
            )
            handles.extend(draft_timer.attach(self.draft))
        else:
            handles.extend(target_timer.attach(self.target))

        generations: list[Generation] = []
        self.last_derivations = []
        total = SpecCounts()
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                for prompt in prompts:
                    verifications.clear()
                    input_ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
                    if cfg.temperature > 0:
                        torch.manual_seed(cfg.seed)
                    kwargs = {"assistant_model": self.draft} if speculating else {}
                    out = self.target.generate(
                        input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        generation_config=gen_config,
                        **kwargs,
                    )
                    sequence = out[0].tolist()
                    new_tokens = sequence[len(prompt) :]
                    counts = None
                    if speculating:
                        derived = derive_counts(
                            len(prompt), verifications, sequence, cfg.stop_token_ids
                        )
                        counts = derived.counts
                        self.last_derivations.append(derived)
                        total.add(counts)
                    generations.append(Generation(token_ids=new_tokens, counts=counts))
            if self._sync:
                torch.cuda.synchronize()
        finally:
            for h in handles:
                h.remove()
        elapsed = time.perf_counter() - start
        return BatchResult(
            generations=generations,
            elapsed_s=elapsed,
            counts=total,
            draft_step_s=draft_timer.mean_s() if speculating else None,
            target_step_s=None if speculating else target_timer.mean_s(),
        )

    def describe(self) -> dict:
        import torch
        import transformers

        return {
            "engine": self.name,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "device": self.device,
            "dtype": self.dtype,
            "torch_threads": torch.get_num_threads(),
            "batching": "one request at a time "
            "(transformers assisted generation supports batch size 1 only)",
            "k_schedule": "constant (num_assistant_tokens=k, assistant_confidence_threshold=0)",
            "counts": "derived exactly from the target's verification forwards",
        }

    def close(self) -> None:
        self.target = None
        self.draft = None
        import gc

        gc.collect()
        if self._sync:
            import torch

            torch.cuda.empty_cache()
