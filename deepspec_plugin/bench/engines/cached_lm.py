"""A causal LM decoded with a KV cache that rows of a batch share while accepting different counts.

Prompts are left-padded; each model keeps a per-row 2D attention mask over its cache (`RowMask`),
in which padding and rejected draft positions are 0 ("holes"), and every forward gets explicit
``position_ids``, so a row never sees its holes and its positions stay those of an unpadded
sequence. Positions rejected in every row are cropped off the cache (`crop`).
"""

from __future__ import annotations


class RowMask:
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

    def _reserve(self, n: int) -> None:
        if self.length + n > self.buf.shape[1]:
            import torch

            bigger = torch.zeros(
                (self.rows, 2 * (self.length + n)), dtype=self.buf.dtype, device=self.buf.device
            )
            bigger[:, : self.length] = self.buf[:, : self.length]
            self.buf = bigger

    def append(self, columns) -> None:
        """Append columns ([rows, n]) for the inputs of a forward."""
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
        """Keep the rows in ``index`` (finished rows leave the batch)."""
        self.buf = self.buf[index]
        self.rows = self.buf.shape[0]
        if not self.dense and bool(self.buf[:, : self.length].all()):
            self.dense = True


def crop(cache, mask: RowMask, n: int, holes: list[int]) -> None:
    """Drop the last ``n`` cache positions (trailing holes in every row); ``holes`` counts each
    row's trailing holes and is updated in place."""
    if n > 0:
        cache.crop(-n)
        mask.length -= n
        for i in range(len(holes)):
            holes[i] -= n


class CachedLM:
    """A loaded HF causal LM, run one forward at a time on an explicit cache, mask and positions."""

    def __init__(self, model):
        import inspect

        self.model = model
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forward(self, input_ids, mask: RowMask, position_ids, cache, keep: int):
        """Logits of the last ``keep`` inputs, ``[rows, keep, V]``; the inputs join the cache."""
        kwargs = {"logits_to_keep": keep} if self._keep_logits else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask.view(),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **kwargs,
        )
        return out.logits[:, -keep:]
