"""EAGLE-3 heads in training: the target's hidden states online, training-time test over N steps.

Per batch, the frozen target runs teacher-forced over the samples (no grad) and hooks keep the
hidden states entering its aux layers: nothing is stored on disk. The head then unrolls as vLLM
proposes (`deepspec_plugin.models.eagle3`):

* step 0, chain index j (every position at once): token x_{j+1} with ``fc(target states at j)``,
  causal attention over the other step-0 entries; it predicts x_{j+2};
* step i >= 1: token x_{j+1+i} (the target's own token: a draft token counts only where every
  earlier one was accepted, i.e. equal to it) with the head's own pre-norm output of step i - 1 at
  j, at position j + i. It attends to the step-0 entries 0..j (the cache vLLM holds) and to the
  entries of its own chain at steps 1..i (the tokens it drafted before), not to other chains.

Step i at j predicts x_{j+2+i}: the stored top-k row of that token, so the data's signal is the
label. Loss weights decay as ``step_weight ** i`` (EAGLE-3 / DeepSpec: 0.8). The head's logits
cover its draft vocabulary only; they get one more column, "any token outside it", at a logit of
-1e30, and the target's top-k ids are mapped into that space, so every loss of ``losses.py`` sees
q = 0 for a token the head can never propose, and the target's mass there counts exactly.

Steps >= 1 run only at the chains a loss reads (the response positions), which keeps the unroll
cheap next to the target's forward over the whole sequence.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.manifest import FILENAME as DRAFT_MANIFEST
from deepspec_plugin.train import distributed as dist
from deepspec_plugin.train.distributed import World
from deepspec_plugin.train.steps import StepDraft, Unrolled

DEFAULT_DRAFT_VOCAB = 8192
DEFAULT_TTT_STEPS = 7
DEFAULT_STEP_WEIGHT = 0.8


# --- the draft vocabulary --------------------------------------------------------------------


@dataclass(frozen=True)
class DraftVocabulary:
    target_ids: list[int]  # sorted: draft id i is target token target_ids[i]
    response_coverage: float  # share of the data's response tokens inside it
    signal_coverage: float  # share of the stored top-k probability mass inside it


def choose_draft_vocabulary(samples: list, size: int, vocab_size: int,
                            required: list[int]) -> DraftVocabulary:
    """The ``size`` target tokens the target writes most often in ``samples`` (its responses;
    ties and the rest filled by stored top-k mass, then by id), always with ``required`` (the stop
    tokens: a head that cannot propose them never drafts the end of a response)."""
    size = min(int(size), vocab_size)
    written: Counter = Counter()
    mass: Counter = Counter()
    for s in samples:
        ids = s.input_ids[s.loss_mask.bool()].tolist()
        written.update(ids)
        if s.topk_ids is not None:
            for i, p in zip(s.topk_ids.reshape(-1).tolist(), s.topk_probs.reshape(-1).tolist()):
                mass[i] += p
    required = sorted({int(i) for i in required if 0 <= int(i) < vocab_size})
    if len(required) > size:
        raise DspecError(f"a draft vocabulary of {size} cannot hold the target's "
                         f"{len(required)} stop tokens", "choose a larger --draft-vocab-size")
    chosen = list(required)
    taken = set(chosen)
    ranked = sorted(set(written) | set(mass), key=lambda t: (-written[t], -mass[t], t))
    for t in ranked:
        if len(chosen) >= size:
            break
        if t not in taken:
            chosen.append(t)
            taken.add(t)
    for t in range(vocab_size):  # more room than the data names: lowest ids, deterministic
        if len(chosen) >= size:
            break
        if t not in taken:
            chosen.append(t)
            taken.add(t)
    total_written = sum(written.values())
    total_mass = sum(mass.values())
    return DraftVocabulary(
        target_ids=sorted(chosen),
        response_coverage=sum(written[t] for t in taken) / max(total_written, 1),
        signal_coverage=sum(mass[t] for t in taken) / max(total_mass, 1e-12),
    )


def check_vocabulary_has_stops(target_ids: list[int], stops: list[int], where: str) -> None:
    missing = sorted(set(stops) - set(target_ids))
    if missing:
        raise DspecError(f"the draft vocabulary of {where} lacks the target's stop token(s) "
                         f"{missing}: the head could never propose the end of a response",
                         "rebuild the vocabulary with the stop tokens (dspec train does)")


# --- the unrolled forward (training-time test) -----------------------------------------------


def _ttt_module(head, steps: int):
    import torch

    class TrainingTimeTest(torch.nn.Module):
        """The head unrolled over ``steps`` draft steps; DDP wraps this, so its forward is the
        whole differentiable computation."""

        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, aux, input_ids, mask):
            return unroll(self.head, aux, input_ids, mask, steps)

    return TrainingTimeTest()


def unroll(head, aux, input_ids, mask, steps: int) -> Unrolled:
    """The training-time test of the module docstring. ``aux`` ``[B, L, n_aux * H]`` (target
    states at positions 0..L-1), ``input_ids`` ``[B, L]`` right-padded, ``mask`` ``[B, L - 1]``
    (collate's: token t + 1 is a response token)."""
    import torch

    from deepspec_plugin.models.eagle3 import attend

    b, length = input_ids.shape
    n = length - 1  # chain j = 0..L-2 reads token x_{j+1} and the target state at j
    device = input_ids.device
    hidden = head.combine(aux[:, :n])
    positions = torch.arange(n, device=device).expand(b, n)
    q, k0, v0, residual = head.qkv(input_ids[:, 1:], hidden, positions)
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    normed, pre = head.finish(attend(q, k0, v0, causal), residual)

    # Chains a loss reads: j where token j + 2 is a response token (collate mask at j + 1).
    label_at = torch.zeros_like(mask)
    label_at[:, :-1] = mask[:, 1:]
    counts = label_at.sum(-1)
    m = int(counts.max()) if b else 0
    logits, rows = [], []
    if m == 0:
        return Unrolled(logits, rows)
    # Per row, the chain indices (stable: in order), padded with index 0 and flagged invalid.
    order = torch.argsort((~label_at).to(torch.int8), dim=-1, stable=True)[:, :m]
    valid = torch.arange(m, device=device)[None] < counts[:, None]
    idx = torch.where(valid, order, torch.zeros_like(order))
    batch_ix = torch.arange(b, device=device)[:, None].expand(b, m)

    def emit(step: int, normed_sel):
        sig_pos = idx + 1 + step  # the collated signal row of token j + 2 + step
        ok = valid & (sig_pos < n)
        ok = ok & mask[batch_ix, sig_pos.clamp(max=n - 1)]
        logits.append(head.logits_with_outside(normed_sel[ok]))
        rows.append((batch_ix[ok], sig_pos[ok]))

    emit(0, normed[batch_ix, idx])
    hidden_sel = pre[batch_ix, idx]
    groups = q.shape[1] // k0.shape[1]
    k0x, v0x = k0.repeat_interleave(groups, 1), v0.repeat_interleave(groups, 1)
    key_ok = torch.arange(n, device=device)[None, None, :] <= idx[:, :, None]  # [B, m, n]
    scale = 1.0 / math.sqrt(q.shape[-1])
    chain_k, chain_v = [], []
    for step in range(1, steps):
        tok_pos = (idx + 1 + step).clamp(max=length - 1)
        tokens = input_ids[batch_ix, tok_pos]
        qi, ki, vi, res = head.qkv(tokens, hidden_sel, idx + step)
        chain_k.append(ki.repeat_interleave(groups, 1))
        chain_v.append(vi.repeat_interleave(groups, 1))
        s0 = (qi @ k0x.transpose(-1, -2)) * scale  # [B, heads, m, n]
        s0 = s0.masked_fill(~key_ok[:, None], float("-inf"))
        sd = torch.stack([(qi * kk).sum(-1) for kk in chain_k], -1) * scale  # [B, heads, m, i]
        w = torch.softmax(torch.cat([s0, sd], -1), -1)
        out = w[..., :n] @ v0x
        for s, vv in enumerate(chain_v):
            out = out + w[..., n + s, None] * vv
        normed_i, hidden_sel = head.finish(out, res)
        emit(step, normed_i)
    return Unrolled(logits, rows)


# --- the draft type --------------------------------------------------------------------------


class Eagle3Draft(StepDraft):
    """An EAGLE-3 head over the frozen target (loaded in every process)."""

    method = "eagle3"

    def __init__(self, head, target, cfg, world: World = World()):
        super().__init__(target, cfg, world, head.cfg.aux_layer_ids, cfg.ttt_steps)
        self.head = head
        self.module = dist.wrap(_ttt_module(head, self.steps), world, cfg.parallel)

    @property
    def id_map(self):
        return self.head.target_to_draft

    # --- init and build --------------------------------------------------------------------

    @classmethod
    def check_init(cls, init_dir: Path, cfg) -> None:
        from deepspec_plugin.models.eagle3 import is_eagle3_dir

        if not is_eagle3_dir(init_dir):
            raise DspecError(f"{init_dir} is not an EAGLE-3 head",
                             "start an EAGLE-3 run from --draft-init eagle3 (the default) or "
                             "from a head this project wrote")

    @classmethod
    def initialise(cls, cfg, dest: Path, seed: int) -> Path:
        """``out/init``: the untrained head, its vocabulary chosen from the data (seeded)."""
        import torch

        from deepspec_plugin.bench.run import stop_token_ids
        from deepspec_plugin.fileio import atomic_dir, read_json_object, write_json
        from deepspec_plugin.models import copy_tokenizer_files, load_causal_lm, load_tokenizer
        from deepspec_plugin.models.eagle3 import (
            Eagle3Config,
            build_head,
            init_from_target,
            write_head,
        )
        from deepspec_plugin.train.batches import split_by_prompt
        from deepspec_plugin.train.data import read_data

        if cfg.draft_init not in ("eagle3", "default"):
            source = Path(cfg.draft_init)
            cls.check_init(source, cfg)
            return source
        if dest.exists():
            return dest
        tcfg = read_json_object(cfg.target / "config.json")
        vocab = int(tcfg["vocab_size"])
        stops = stop_token_ids(load_tokenizer(cfg.target), cfg.target)
        train_set, _ = split_by_prompt(list(read_data(cfg.data)), cfg.eval_fraction, cfg.seed)
        size = cfg.draft_vocab_size or min(DEFAULT_DRAFT_VOCAB, vocab)
        chosen = choose_draft_vocabulary(train_set, size, vocab, stops)
        config = Eagle3Config.for_target(tcfg, len(chosen.target_ids),
                                         list(cfg.aux_layer_ids) if cfg.aux_layer_ids else None)
        target = load_causal_lm(cfg.target)
        torch.manual_seed(seed)
        head = build_head(config, target.get_input_embeddings())
        head.set_vocabulary(chosen.target_ids)
        init_from_target(head, target)
        with atomic_dir(dest, overwrite=True) as tmp:
            write_head(head, tmp)
            copy_tokenizer_files(cfg.target, tmp)
            write_json(tmp / "vocabulary.json", {
                "draft_vocab_size": len(chosen.target_ids), "stop_token_ids": list(stops),
                "response_coverage": chosen.response_coverage,
                "signal_coverage": chosen.signal_coverage, "chosen_by": "response frequency"})
        return dest

    @classmethod
    def build(cls, cfg, world: World, init_dir: Path, weights: Path | None) -> Eagle3Draft:
        from deepspec_plugin.bench.run import stop_token_ids
        from deepspec_plugin.models import load_causal_lm, load_tokenizer
        from deepspec_plugin.models.eagle3 import load_head

        target = load_causal_lm(cfg.target, device=cfg.device)  # frozen, eval
        head = load_head(weights if weights is not None else init_dir, target, cfg.device)
        check_vocabulary_has_stops(head.draft_to_target_ids().tolist(),
                                   stop_token_ids(load_tokenizer(cfg.target), cfg.target),
                                   str(init_dir))
        for name, p in head.named_parameters():
            p.requires_grad_(True)
        head.train()
        return cls(head, target, cfg, world)

    # --- output ------------------------------------------------------------------------------

    def causal_lm(self):
        raise DspecError("an EAGLE-3 head is not a causal LM: it cannot write on-policy rollouts",
                         "train EAGLE-3 with --on-policy 0")

    def write_weights(self, dest: Path | None) -> None:
        from deepspec_plugin.models.eagle3 import write_head

        if self.world.is_main:
            Path(dest).mkdir(parents=True, exist_ok=True)
            write_head(self.head, dest)

    def save(self, out: Path, target: Path, manifest: dict[str, Any]) -> Path:
        from deepspec_plugin.fileio import atomic_dir
        from deepspec_plugin.manifest import write_manifest
        from deepspec_plugin.models import copy_tokenizer_files
        from deepspec_plugin.models.eagle3 import write_head

        dest = out / "draft"
        if self.world.is_main:
            with atomic_dir(dest, overwrite=True) as tmp:
                write_head(self.head, tmp)
                copy_tokenizer_files(target, tmp)
                write_manifest(manifest, tmp / DRAFT_MANIFEST)
        return dest

    def describe(self) -> str:
        c = self.head.cfg
        n = sum(p.numel() for p in self.head.parameters())
        return (f"EAGLE-3 head: {n:,} trainable parameters, draft vocabulary {c.draft_vocab_size} "
                f"of {c.vocab_size}, target layers {list(c.aux_layer_ids)} (vLLM ids), "
                f"training-time test over {self.steps} steps (weights {self.cfg.step_weight}^i)")

    def manifest_fields(self) -> dict[str, Any]:
        c = self.head.cfg
        return {"eagle3": {
            "target_layer_ids": list(c.aux_layer_ids), "layer_id_convention": "vllm (input of "
            "layer i)", "draft_vocab_size": c.draft_vocab_size, "vocab_size": c.vocab_size,
            "ttt_steps": self.steps, "step_weight": float(self.cfg.step_weight),
            "prompt_labels": self.prompt_labels,
            "parameters": sum(p.numel() for p in self.head.parameters()),
            "hidden_states_on_disk_bytes": 0, **self.timing()}}
