"""The reference engine: this project's own exact speculative sampling, in torch, on HF models.

Plain decoding (``k=None``) and speculative decoding of a target with a draft, batched, with a KV
cache per model (transformers ``DynamicCache``), greedy (temperature 0) or sampled. Sampling uses
the exact rule of ``rejection.py``, so every output token follows the target's distribution; at
temperature 0 the output is the target's greedy decoding token for token.

How a batch whose rows accept different numbers of tokens shares one cache:

* prompts are left-padded; each model keeps a per-row 2D attention mask over its cache, in which
  padding and rejected draft positions are 0 ("holes"), and every forward gets explicit
  ``position_ids`` (the number of valid tokens before each position), so a row never sees its
  holes and its positions stay those of an unpadded sequence;
* after verification the cache is cropped by the number of trailing rejected positions common to
  EVERY row (batch size 1 therefore never has holes); the rest are masked per row;
* the last token emitted for a row (the "pending" token) is in neither cache yet; it is the first
  input of the next draft and of the next verification;
* a `Proposer` (``proposer.py``; by default `DraftModelProposer`: the draft model from its own
  cache) proposes k tokens at the run's temperature, with q for the rule, and rolls back what
  the target rejected; the engine verifies and applies the rule, whatever the proposer;
* finished rows leave the batch (their cache rows are dropped), so nothing is drafted for them.

The per-row mask, the crop and the cached forward are in ``cached_lm.py``; step timing in
``timing.py``.

Counts mirror vLLM v1 (read in vllm/v1/core/sched/scheduler.py, 0.32): a draft always proposes k
tokens (vLLM caps the draft only by the model's context length, never by ``max_tokens``), and a
verification counts ``num_accepted = emitted - 1`` before the output is cut at a stop token or at
``max_tokens``; a request finishes without drafting again. The same greedy run therefore gives the
same ``SpecCounts`` here and in vLLM. Identities this engine guarantees, per request:

* ``num_draft_tokens == k * num_drafts``;
* ``len(token_ids) == 1 + num_accepted_tokens + num_drafts - dropped``, where the 1 is the token
  of the prefill, each draft emits its accepted tokens plus one (the resampled or bonus token),
  and ``dropped`` (>= 0) are the tokens the last draft emitted past a stop token or
  ``max_new_tokens``; ``dropped == 0`` for every request that ends neither way mid-draft.

Sliding-window attention counts physical cache positions, holes included; models with a window
shorter than the sequence are therefore not exact here in batches (batch size 1 is).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepspec_plugin.bench.engines.base import (
    BatchResult,
    Engine,
    Generation,
    GenerationConfig,
    check_draft_sample_method,
)
from deepspec_plugin.bench.engines.cached_lm import CachedLM, RowMask, crop
from deepspec_plugin.bench.engines.proposer import DraftModelProposer, Proposer
from deepspec_plugin.bench.engines.timing import StepTimer
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts


class _Request:
    """One prompt's output as it grows, cut at a stop token or at the length limit."""

    def __init__(self, cfg: GenerationConfig):
        self.tokens: list[int] = []
        self.counts = SpecCounts()
        self.done = False
        self._stops = frozenset(cfg.stop_token_ids)
        self._max = cfg.max_new_tokens

    def extend(self, new_tokens: list[int]) -> None:
        for t in new_tokens:
            self.tokens.append(t)
            if t in self._stops or len(self.tokens) >= self._max:
                self.done = True
                return


class ReferenceEngine(Engine):
    """Exact speculative sampling of a loaded HF target, with a draft model or another proposer.

    ``proposer`` replaces the default `DraftModelProposer` over ``draft_model``: the engine's
    verification and accept / resample rule stay the same for any `Proposer`.
    """

    name = "reference"

    def __init__(
        self, target_model, draft_model=None, device: str = "cpu", proposer: Proposer | None = None,
        draft_sample_method: str = "probabilistic", skinny_linears: bool = True,
    ):
        import torch

        self.draft_sample_method = check_draft_sample_method(draft_sample_method)
        self.device = torch.device(device)
        self.target = target_model.to(self.device).eval()
        self.draft = draft_model.to(self.device).eval() if draft_model is not None else None
        if self.draft is not None:
            tv, dv = _vocab_size(self.target), _vocab_size(self.draft)
            if tv != dv:
                raise DspecError(
                    f"the draft's vocabulary ({dv} logits) differs from the target's ({tv})",
                    "use a draft with the target's tokenizer and vocabulary"
                    " (dspec models draft-init makes one)",
                )
        self._target = CachedLM(self.target)
        if proposer is None and self.draft is not None:
            proposer = DraftModelProposer(CachedLM(self.draft), self.device)
        self.proposer = proposer
        # Plain and speculative decoding alike: a baseline left on MKL's slow few-row path would
        # flatter every draft (skinny_linear.py says why and by how much).
        from deepspec_plugin.bench.engines.skinny_linear import use_skinny_linears

        modules = [self.target, self.draft, *(vars(proposer).values() if proposer else ())]
        self.skinny_linears = sum(use_skinny_linears(m, skinny_linears) for m in modules
                                  if isinstance(m, torch.nn.Module)) > 0

    @classmethod
    def from_paths(
        cls, target: Path, draft: Path | None = None, device: str = "cpu", dtype: str = "float32",
        draft_sample_method: str = "probabilistic", skinny_linears: bool = True,
    ) -> ReferenceEngine:
        from deepspec_plugin.models import check_pair, load_causal_lm
        from deepspec_plugin.models.files import head_draft_kind, is_eagle3_dir

        if draft is not None and is_eagle3_dir(draft):
            from deepspec_plugin.bench.engines.eagle3_proposer import Eagle3Proposer
            from deepspec_plugin.models.eagle3 import load_head

            target_model = load_causal_lm(Path(target), device=device, dtype=dtype)
            head = load_head(draft, target_model, device=device).to(target_model.dtype)
            return cls(target_model, None, device=device, proposer=Eagle3Proposer(head, device),
                       draft_sample_method=draft_sample_method, skinny_linears=skinny_linears)
        if draft is not None:
            check_pair(Path(target), Path(draft))
        if draft is not None and head_draft_kind(draft) is not None:
            from deepspec_plugin.bench.engines.head_proposer import HeadProposer
            from deepspec_plugin.models.heads import load_heads

            target_model = load_causal_lm(Path(target), device=device, dtype=dtype)
            heads = load_heads(draft, target_model, device=device).to(target_model.dtype)
            proposer = HeadProposer(heads, target_model.model.norm,
                                    target_model.config.num_hidden_layers, device)
            return cls(target_model, None, device=device, proposer=proposer,
                       draft_sample_method=draft_sample_method, skinny_linears=skinny_linears)
        target_model = load_causal_lm(Path(target), device=device, dtype=dtype)
        draft_model = load_causal_lm(Path(draft), device=device, dtype=dtype) if draft else None
        return cls(target_model, draft_model, device=device,
                   draft_sample_method=draft_sample_method, skinny_linears=skinny_linears)

    # --- the Engine interface ------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig,
                 on_logits: Callable[[list[int], Any], None] | None = None) -> BatchResult:
        """Decode ``prompts`` under ``cfg``. ``on_logits(rows, logits)``, plain decoding only,
        sees every forward's next-token logits (``[len(rows), V]``, before temperature) for the
        prompts ``rows``: exactly one per output token, the distribution it was drawn from
        (training data takes its signal from them instead of a second forward)."""
        import torch

        if on_logits is not None and cfg.k is not None:
            raise DspecError("on_logits observes plain decoding only",
                             "pass k=None, or drop on_logits")
        self._check(prompts, cfg)
        requests = [_Request(cfg) for _ in prompts]
        with torch.inference_mode():
            generator = torch.Generator(device=self.device)
            generator.manual_seed(cfg.seed)
            self._sync()
            started = time.perf_counter()
            timer = StepTimer(self.device)
            verify_timer = StepTimer(self.device, widths=(cfg.k + 1,)) if cfg.k else None
            if cfg.k is None:
                self._plain(prompts, cfg, requests, generator, timer, on_logits)
            else:
                self._speculative(prompts, cfg, requests, generator, timer, verify_timer)
            self._sync()
            elapsed = time.perf_counter() - started
            step_s = timer.mean_s()
        return BatchResult(
            generations=[Generation(r.tokens, r.counts) for r in requests],
            elapsed_s=elapsed,
            counts=SpecCounts.total(r.counts for r in requests),
            draft_step_s=step_s if cfg.k is not None else None,
            target_step_s=step_s if cfg.k is None else None,
            verify_step_s=verify_timer.mean_s() if verify_timer else None,
        )

    def describe(self) -> dict:
        import torch

        return {
            "engine": self.name,
            "device": str(self.device),
            "dtype": str(next(self.target.parameters()).dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device_name": (
                torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
            ),
            "target": getattr(self.target.config, "_name_or_path", "") or None,
            "draft": (getattr(self.draft.config, "_name_or_path", "") or None)
            if self.draft
            else None,
            "draft_type": self.draft_type,
            "draft_sample_method": self.draft_sample_method if self.proposer else None,
            "linears": "skinny" if self.skinny_linears else "torch",
        }

    @property
    def draft_type(self) -> str | None:
        """What proposes: ``draft_model``, ``eagle3``, ``medusa``, ``mlp_speculator`` (heads on
        the target's states), or None."""
        if self.proposer is None:
            return None
        return getattr(self.proposer, "method", "draft_model")

    def close(self) -> None:
        import gc

        import torch

        self.target = self.draft = self._target = self.proposer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- decoding ------------------------------------------------------------------------------

    def _plain(self, prompts, cfg, requests, generator, timer, on_logits=None) -> None:
        """Decode the target alone; times each single-token step."""
        import torch

        from deepspec_plugin.bench.engines.rejection import sample_from_logits

        ids, mask = self._left_pad(prompts)
        masks = RowMask(mask, self.device)
        cache = self._target.new_cache()
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = self._target.forward(ids, masks, positions, cache, keep=1)[:, -1]
        num_valid = mask.sum(-1, keepdim=True)  # the position of the next input token
        active = list(range(len(prompts)))
        if on_logits is not None:
            on_logits(active, logits)
        token = sample_from_logits(logits, cfg.temperature, generator)
        while True:
            for row, t in zip(active, token.tolist()):
                requests[row].extend([t])
            keep = [i for i, row in enumerate(active) if not requests[row].done]
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                masks.select(index)
                num_valid, token = num_valid[index], token[index]
                active = [active[i] for i in keep]
            masks.append_ones(1)
            started = timer.start()
            logits = self._target.forward(token[:, None], masks, num_valid, cache, keep=1)
            timer.stop(started)
            num_valid = num_valid + 1
            if on_logits is not None:
                on_logits(active, logits[:, -1])
            token = sample_from_logits(logits[:, -1], cfg.temperature, generator)

    def _speculative(self, prompts, cfg, requests, generator, timer, verify_timer) -> None:
        """Propose k tokens, verify them in one target pass, repeat; the proposer times its
        single-token steps. A proposer with ``target_layers`` (EAGLE-3, Medusa, MLP speculator)
        gets the target's hidden states entering those layers (id = the number of layers: the
        last layer's output) from the prefill and from every verification."""
        proposer = self.proposer
        # Under the greedy rule (vLLM's default at any temperature) the draft proposes its argmax
        # and the rule sees q as one-hot on it: still exact, but accepts less at T > 0.
        sampled = self.draft_sample_method == "probabilistic"
        layers = getattr(proposer, "target_layers", None)  # a head that reads target states
        capture = None
        if layers:
            from deepspec_plugin.models.eagle3 import AuxHiddenStates

            capture = AuxHiddenStates(self.target, layers)
        try:
            self._speculate(prompts, cfg, requests, generator, timer, verify_timer, capture,
                            sampled)
        finally:
            if capture is not None:
                capture.remove()

    def _speculate(self, prompts, cfg, requests, generator, timer, verify_timer, capture,
                   sampled) -> None:
        import torch

        from deepspec_plugin.bench.engines.rejection import (
            greedy_verify,
            probs_from_logits,
            rejection_sample,
            sample_from_logits,
        )

        k, temperature, device = cfg.k, cfg.temperature, self.device
        proposer = self.proposer

        def states() -> dict:
            return {"target_states": capture.take()} if capture is not None else {}

        ids, mask = self._left_pad(prompts)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        t_mask, t_cache = RowMask(mask, device), self._target.new_cache()
        logits = self._target.forward(ids, t_mask, positions, t_cache, keep=1)[:, -1]
        proposer.prefill(ids, mask, positions, **states())
        t_valid = mask.sum(-1)  # valid tokens in the target cache per row: the next position
        pending = sample_from_logits(logits, temperature, generator)
        offsets = torch.arange(k + 1, device=device)

        active = list(range(len(prompts)))
        for row, t in zip(active, pending.tolist()):
            requests[row].extend([t])
        t_holes = [0] * len(active)  # trailing holes per row (host side) after the last crop
        while True:
            keep = [i for i, row in enumerate(active) if not requests[row].done]
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                t_cache.batch_select_indices(index)
                t_mask.select(index)
                t_valid, pending = t_valid[index], pending[index]
                active = [active[i] for i in keep]
                t_holes = [t_holes[i] for i in keep]
                # Holes that were trailing in every remaining row can go now.
                crop(t_cache, t_mask, max(0, min(t_holes)), t_holes)
                proposer.select(index, keep)

            proposal = proposer.propose(pending, k, temperature, generator, timer, sampled)

            # --- verify: the target scores [pending, d_1..d_k] in one pass
            t_start = t_mask.length
            t_mask.append_ones(k + 1)
            verify_inputs = torch.cat([pending[:, None], proposal.tokens], 1)
            started = verify_timer.start()
            target_logits = self._target.forward(
                verify_inputs, t_mask, t_valid[:, None] + offsets, t_cache, keep=k + 1
            )
            verify_timer.stop(started, width=k + 1)
            target_states = states()
            if temperature == 0:
                num_accepted, next_token = greedy_verify(target_logits, proposal.tokens)
            else:
                p = probs_from_logits(target_logits, temperature)
                q = proposal.probs
                if q is None:  # greedy drafting: q is one-hot on each proposed token
                    q = torch.zeros_like(p[:, :k]).scatter_(-1, proposal.tokens[..., None], 1.0)
                num_accepted, next_token = rejection_sample(p, q, proposal.tokens, generator)
            # The loop's one synchronisation: what each row emits.
            host = torch.cat(
                [proposal.tokens, num_accepted[:, None], next_token[:, None]], 1
            ).tolist()

            # --- bookkeeping on the host
            accepted = [h[k] for h in host]
            for row, h, a in zip(active, host, accepted):
                req = requests[row]
                req.counts.record_draft(k, a)
                req.extend(h[:a] + [h[k + 1]])

            # --- target cache: valid are pending and d_1..d_a; d_{a+1}..d_k are holes
            t_holes = [k - a for a in accepted]
            crop(t_cache, t_mask, min(t_holes), t_holes)
            if max(t_holes) > 0:  # else the columns appended as ones are all valid
                kept = t_mask.length - t_start
                t_mask.buf[:, t_start : t_mask.length] = (
                    offsets[:kept] <= num_accepted[:, None]
                ).long()
                t_mask.dense = False
            t_valid = t_valid + num_accepted + 1
            proposer.rollback(num_accepted, accepted, **target_states)
            pending = next_token

    # --- helpers -------------------------------------------------------------------------------

    def _check(self, prompts: list[list[int]], cfg: GenerationConfig) -> None:
        if cfg.max_new_tokens < 1:
            raise DspecError(f"max_new_tokens is {cfg.max_new_tokens}", "ask for at least 1 token")
        if cfg.temperature < 0:
            raise DspecError(
                f"temperature is {cfg.temperature}", "use 0 (greedy) or a positive value"
            )
        if cfg.k is not None:
            if cfg.k < 1:
                raise DspecError(f"k is {cfg.k}", "use k >= 1, or k=None for plain decoding")
            if self.proposer is None:
                raise DspecError(
                    "speculative decoding asked of a reference engine without a draft",
                    "load the engine with a draft model",
                )
            max_k = getattr(self.proposer, "max_k", None)
            if max_k is not None and cfg.k > max_k:
                raise DspecError(f"k is {cfg.k}, but this {self.draft_type} draft proposes at "
                                 f"most {max_k} tokens (one per head)",
                                 f"bench with k <= {max_k}, or train more heads (--heads)")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise DspecError("an empty batch or an empty prompt", "give every request >= 1 token")

    def _left_pad(self, prompts: list[list[int]]):
        import torch

        width = max(len(p) for p in prompts)
        ids = [[0] * (width - len(p)) + list(p) for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        return (
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(mask, dtype=torch.long, device=self.device),
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def _vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])
