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
* the draft proposes k tokens autoregressively from its own cache, at the run's temperature, and
  keeps q for the rule. It never feeds its own last token d_k; where a row accepted all k, d_k is
  therefore missing from the draft cache, and the next draft step feeds [d_k, pending] (d_k
  masked out for the other rows);
* finished rows leave the batch (their cache rows are dropped), so nothing is drafted for them.

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
from pathlib import Path

from deepspec_plugin.bench.engines.base import BatchResult, Engine, Generation, GenerationConfig
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts


class _Mask:
    """A per-row attention mask over a cache, in a buffer that grows by doubling.

    ``dense`` stays True while the mask has no zero (no padding, no holes: always so at batch
    size 1); the model then gets no mask at all, which spares it building one each step.
    """

    def __init__(self, initial, device):
        import torch

        self.rows, self.length = initial.shape
        self.dense = bool(initial.all())
        self.buf = torch.zeros(
            (self.rows, max(64, 2 * self.length)), dtype=torch.long, device=device
        )
        self.buf[:, : self.length] = initial
        self.ones = torch.ones((1, 1), dtype=torch.long, device=device)

    def _reserve(self, n: int) -> None:
        if self.length + n > self.buf.shape[1]:
            import torch

            bigger = torch.zeros(
                (self.rows, 2 * (self.length + n)), dtype=self.buf.dtype, device=self.buf.device
            )
            bigger[:, : self.length] = self.buf[:, : self.length]
            self.buf = bigger

    def append(self, columns) -> None:
        """Append columns ([rows, n], or [1, 1] ones broadcast) for the inputs of a forward."""
        self._reserve(columns.shape[1])
        self.buf[:, self.length : self.length + columns.shape[1]] = columns
        self.length += columns.shape[1]

    def append_ones(self, n: int) -> None:
        self._reserve(n)
        self.buf[:, self.length : self.length + n] = 1
        self.length += n

    def view(self):
        return None if self.dense else self.buf[:, : self.length]

    def select(self, index) -> None:
        self.buf = self.buf[index]
        self.rows = self.buf.shape[0]
        if not self.dense and bool(self.buf[:, : self.length].all()):
            self.dense = True


class _StepTimer:
    """Mean wall time of marked forward steps: CUDA events on a GPU (no sync per step)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pairs: list = []
        self.total = 0.0
        self.count = 0

    def start(self):
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started) -> None:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.pairs.append((started, event))
        else:
            self.total += time.perf_counter() - started
            self.count += 1

    def mean_s(self) -> float | None:
        """Call after the device is synchronised."""
        if self.cuda:
            if not self.pairs:
                return None
            return sum(a.elapsed_time(b) for a, b in self.pairs) / 1000.0 / len(self.pairs)
        return self.total / self.count if self.count else None


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
    """Exact speculative sampling of a loaded HF target with an optional HF draft."""

    name = "reference"

    def __init__(self, target_model, draft_model=None, device: str = "cpu"):
        import inspect

        import torch

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
        self._keep_logits = {
            id(m): "logits_to_keep" in inspect.signature(m.forward).parameters
            for m in (self.target, self.draft)
            if m is not None
        }

    @classmethod
    def from_paths(
        cls, target: Path, draft: Path | None = None, device: str = "cpu", dtype: str = "float32"
    ) -> ReferenceEngine:
        from deepspec_plugin.models import check_pair, load_causal_lm

        if draft is not None:
            check_pair(Path(target), Path(draft))
        target_model = load_causal_lm(Path(target), device=device, dtype=dtype)
        draft_model = load_causal_lm(Path(draft), device=device, dtype=dtype) if draft else None
        return cls(target_model, draft_model, device=device)

    # --- the Engine interface ------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> BatchResult:
        import torch

        self._check(prompts, cfg)
        requests = [_Request(cfg) for _ in prompts]
        with torch.inference_mode():
            generator = torch.Generator(device=self.device)
            generator.manual_seed(cfg.seed)
            self._sync()
            started = time.perf_counter()
            timer = _StepTimer(self.device)
            if cfg.k is None:
                self._plain(prompts, cfg, requests, generator, timer)
            else:
                self._speculative(prompts, cfg, requests, generator, timer)
            self._sync()
            elapsed = time.perf_counter() - started
            step_s = timer.mean_s()
        return BatchResult(
            generations=[Generation(r.tokens, r.counts) for r in requests],
            elapsed_s=elapsed,
            counts=SpecCounts.total(r.counts for r in requests),
            draft_step_s=step_s if cfg.k is not None else None,
            target_step_s=step_s if cfg.k is None else None,
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
        }

    def close(self) -> None:
        import gc

        import torch

        self.target = self.draft = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- decoding ------------------------------------------------------------------------------

    def _plain(self, prompts, cfg, requests, generator, timer) -> None:
        """Decode the target alone; times each single-token step."""
        import torch

        from deepspec_plugin.bench.engines.rejection import sample_from_logits

        ids, mask = self._left_pad(prompts)
        masks = _Mask(mask, self.device)
        cache = self._new_cache(self.target)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = self._forward(self.target, ids, masks, positions, cache, keep=1)[:, -1]
        num_valid = mask.sum(-1, keepdim=True)  # the position of the next input token
        token = sample_from_logits(logits, cfg.temperature, generator)
        active = list(range(len(prompts)))
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
            logits = self._forward(self.target, token[:, None], masks, num_valid, cache, keep=1)
            timer.stop(started)
            num_valid = num_valid + 1
            token = sample_from_logits(logits[:, -1], cfg.temperature, generator)

    def _speculative(self, prompts, cfg, requests, generator, timer) -> None:
        """Draft k tokens, verify them in one target pass, repeat; times 1-token draft steps."""
        import torch

        from deepspec_plugin.bench.engines.rejection import (
            greedy_verify,
            probs_from_logits,
            rejection_sample,
            sample_from_logits,
            sample_from_probs,
        )

        k, temperature, device = cfg.k, cfg.temperature, self.device
        greedy = temperature == 0
        ids, mask = self._left_pad(prompts)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        t_mask, d_mask = _Mask(mask, device), _Mask(mask, device)
        t_cache, d_cache = self._new_cache(self.target), self._new_cache(self.draft)
        logits = self._forward(self.target, ids, t_mask, positions, t_cache, keep=1)[:, -1]
        self._forward(self.draft, ids, d_mask, positions, d_cache, keep=1)
        # Valid tokens in each cache per row, i.e. the position of the next token fed to it.
        t_valid = mask.sum(-1)
        d_valid = t_valid.clone()
        pending = sample_from_logits(logits, temperature, generator)
        # Rows whose last draft was fully accepted: their d_k is not in the draft cache yet.
        full = torch.zeros_like(pending, dtype=torch.bool)
        last_draft = torch.zeros_like(pending)
        any_full = False
        offsets = torch.arange(k + 1, device=device)

        active = list(range(len(prompts)))
        for row, t in zip(active, pending.tolist()):
            requests[row].extend([t])
        # Trailing holes per row (host side) after the last crop, in each cache.
        t_holes = [0] * len(active)
        d_holes = [0] * len(active)
        while True:
            keep = [i for i, row in enumerate(active) if not requests[row].done]
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                for c in (t_cache, d_cache):
                    c.batch_select_indices(index)
                t_mask.select(index)
                d_mask.select(index)
                t_valid, d_valid = t_valid[index], d_valid[index]
                pending, full, last_draft = pending[index], full[index], last_draft[index]
                active = [active[i] for i in keep]
                t_holes = [t_holes[i] for i in keep]
                d_holes = [d_holes[i] for i in keep]
                any_full = min(d_holes) < 0
                # Holes that were trailing in every remaining row can go now.
                self._crop(t_cache, t_mask, max(0, min(t_holes)), t_holes)
                self._crop(d_cache, d_mask, max(0, min(d_holes)), d_holes)

            # --- draft: k tokens, autoregressively from the draft's cache
            if any_full:
                inputs = torch.stack([last_draft, pending], 1)
                d_mask.append(torch.stack([full.long(), torch.ones_like(pending)], 1))
                d_mask.dense = d_mask.dense and max(d_holes) == -1  # every row lacked d_k
                step_positions = torch.stack([d_valid, d_valid + full], 1)
                d_valid = d_valid + full + 1
            else:
                inputs = pending[:, None]
                d_mask.append_ones(1)
                step_positions = d_valid[:, None]
                d_valid = d_valid + 1
            d_start = d_mask.length - 1  # the column of `pending` in the draft mask
            drafts, draft_probs = [], []
            for i in range(k):
                timed = inputs.shape[1] == 1
                started = timer.start() if timed else None
                step_logits = self._forward(
                    self.draft, inputs, d_mask, step_positions, d_cache, keep=1
                )[:, -1]
                if timed:
                    timer.stop(started)
                if greedy:
                    token = step_logits.argmax(-1)
                else:
                    q = probs_from_logits(step_logits, temperature)
                    token = sample_from_probs(q, generator)
                    draft_probs.append(q)
                drafts.append(token)
                if i < k - 1:
                    inputs = token[:, None]
                    d_mask.append_ones(1)
                    step_positions = d_valid[:, None]
                    d_valid = d_valid + 1
            draft_tokens = torch.stack(drafts, 1)

            # --- verify: the target scores [pending, d_1..d_k] in one pass
            t_start = t_mask.length
            t_mask.append_ones(k + 1)
            verify_inputs = torch.cat([pending[:, None], draft_tokens], 1)
            target_logits = self._forward(
                self.target, verify_inputs, t_mask, t_valid[:, None] + offsets, t_cache, keep=k + 1
            )
            if greedy:
                num_accepted, next_token = greedy_verify(target_logits, draft_tokens)
            else:
                num_accepted, next_token = rejection_sample(
                    probs_from_logits(target_logits, temperature),
                    torch.stack(draft_probs, 1),
                    draft_tokens,
                    generator,
                )
            # The loop's one synchronisation: what each row emits.
            host = torch.cat([draft_tokens, num_accepted[:, None], next_token[:, None]], 1).tolist()

            # --- bookkeeping on the host
            accepted = [h[k] for h in host]
            for row, h, a in zip(active, host, accepted):
                req = requests[row]
                req.counts.record_draft(k, a)
                req.extend(h[:a] + [h[k + 1]])

            # --- target cache: valid are pending and d_1..d_a; d_{a+1}..d_k are holes
            t_holes = [k - a for a in accepted]
            self._crop(t_cache, t_mask, min(t_holes), t_holes)
            if max(t_holes) > 0:  # else the columns appended as ones are all valid
                kept = t_mask.length - t_start
                t_mask.buf[:, t_start : t_mask.length] = (
                    offsets[:kept] <= num_accepted[:, None]
                ).long()
                t_mask.dense = False
            t_valid = t_valid + num_accepted + 1

            # --- draft cache: holds pending and d_1..d_{k-1}; d_i (i <= k-1) is valid iff i <= a.
            # A row that accepted all k lacks d_k: a hole count of -1 marks it.
            d_holes = [k - 1 - a for a in accepted]
            self._crop(d_cache, d_mask, max(0, min(d_holes)), d_holes)
            if max(d_holes) > 0:
                kept = d_mask.length - d_start  # pending and the d_i still in the cache
                d_mask.buf[:, d_start : d_mask.length] = (
                    offsets[:kept] <= num_accepted[:, None]
                ).long()
                d_mask.dense = False
            d_valid = d_valid - (k - 1 - num_accepted.clamp(max=k - 1))
            full = num_accepted == k
            any_full = k in accepted
            last_draft = draft_tokens[:, -1]
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
            if self.draft is None:
                raise DspecError(
                    "speculative decoding asked of a reference engine without a draft",
                    "load the engine with a draft model",
                )
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

    def _new_cache(self, model):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def _forward(self, model, input_ids, mask: _Mask, position_ids, cache, keep: int):
        kwargs = {"logits_to_keep": keep} if self._keep_logits[id(model)] else {}
        out = model(
            input_ids=input_ids,
            attention_mask=mask.view(),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **kwargs,
        )
        return out.logits[:, -keep:]

    @staticmethod
    def _crop(cache, mask: _Mask, n: int, holes: list[int]) -> None:
        """Drop the last ``n`` cache positions (trailing holes in every row)."""
        if n > 0:
            cache.crop(-n)
            mask.length -= n
            for i in range(len(holes)):
                holes[i] -= n

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def _vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])
