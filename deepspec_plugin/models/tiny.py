"""The tiny test models: a tokenizer, a 4-layer Llama target and a 1-layer draft, built in seconds.

Deterministic from a seed, shaped so that the pair is useful for speculative decoding (see
:func:`_shape_tiny_weights`); ``perturb`` adds an updated target (weight noise) for drift tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deepspec_plugin.fileio import atomic_dir, write_json
from deepspec_plugin.models.draft_init import draft_init
from deepspec_plugin.models.loading import load_causal_lm
from deepspec_plugin.models.tokenizer import (
    CHATML_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    load_tokenizer,
    write_portable_tokenizer_config,
)

TINY_VOCAB_SIZE = 512


TINY_PROMPT_FILES = ("gsm8k.jsonl", "humaneval.jsonl")


# Initial-weight shaping that makes the tiny pair useful for speculative decoding (see
# `_shape_tiny_weights`). Tuned so the 1-layer draft's greedy agreement with the 4-layer target
# is in the 0.4-0.85 band (teacher-forced, 64 tokens: 0.50-0.70 over seeds 0, 3, 4 on
# mt-bench, gsm8k and humaneval prompts; 0.68 for seed 0 on mt-bench);
# `tests/test_models.py` checks the band.
_TINY_EMBED_STD = 0.08


_TINY_QK_SCALE = 3.0


_TINY_LM_HEAD_STD = 0.2


_TINY_EOS_ROW_SCALE = 0.3


@dataclass
class TinyModels:
    """The tiny test models; tokenizer files are inside each model directory."""

    root: Path
    target: Path
    draft: Path
    target_updated: Path | None


def tiny_prompt_texts() -> list[str]:
    data_dir = Path(__file__).parent.parent / "bench" / "data" / "prompts"
    texts: list[str] = []
    for name in TINY_PROMPT_FILES:
        for line in (data_dir / name).read_text().splitlines():
            if line.strip():
                texts.extend(json.loads(line)["turns"])
    return texts


def train_tiny_tokenizer(texts: list[str], vocab_size: int = TINY_VOCAB_SIZE):
    """A byte-level BPE tokenizer with ChatML specials, trained on the packaged prompts."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _tiny_config(tokenizer):
    from transformers import LlamaConfig

    vocab = len(tokenizer)
    vocab += (-vocab) % 64  # a multiple of 64 (512 already is)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    bos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=bos,
        rms_norm_eps=1e-5,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def _shape_tiny_weights(model, config, generator) -> None:
    """Make a random pair useful: the 1-layer draft should often agree with the 4-layer target.

    With the default init (std 0.02 everywhere) the embeddings are tiny next to what each layer
    adds, so the last layers decide the next token and a 1-layer truncation barely agrees. Larger
    embeddings let the residual stream carry the current token, so the later layers refine layer
    0's prediction instead of replacing it. Sharper attention (larger q/k) makes the next token
    depend on the context, so greedy generations loop less. The lm_head is sharper than the
    default init so that sampling stays close to greedy, and the EOS/BOS rows are damped so that
    generations run to their length limit instead of stopping at once.
    """
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, _TINY_EMBED_STD, generator=generator)
        model.lm_head.weight.normal_(0.0, _TINY_LM_HEAD_STD, generator=generator)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(_TINY_QK_SCALE)
            layer.self_attn.k_proj.weight.mul_(_TINY_QK_SCALE)
        eos_ids = (
            config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        )
        for i in set(eos_ids) | {config.bos_token_id}:
            model.lm_head.weight[i].mul_(_TINY_EOS_ROW_SCALE)


def _with_silent_layers(config, state: dict, n: int):
    """``n`` more layers, copies of the first ones whose o_proj and down_proj are zero: each adds
    exactly 0 to the residual stream, so the outputs are unchanged."""
    import copy

    layers = config.num_hidden_layers
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers + n
    state = dict(state)
    for j in range(n):
        src, dst = f"model.layers.{j % layers}.", f"model.layers.{layers + j}."
        for name in [k for k in state if k.startswith(src)]:
            t = state[name].clone()
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                t.zero_()
            state[dst + name[len(src):]] = t
    return config, state


def _save_generation_config(dst: Path, eos_ids: list[int], bos: int, pad: int) -> None:
    write_json(
        dst / "generation_config.json",
        {"bos_token_id": bos, "eos_token_id": eos_ids, "pad_token_id": pad, "do_sample": False},
    )


def _save_state(state: dict, config, tokenizer, dst: Path) -> None:
    """Write config, float32 safetensors weights (sorted names) and tokenizer into `dst`."""
    from safetensors.torch import save_file

    save_file(
        {k: state[k].contiguous() for k in sorted(state)},
        str(dst / "model.safetensors"),
        metadata={"format": "pt"},
    )
    cfg = config.to_dict()
    # Keeps builds byte-identical across library versions and says nothing about the model.
    cfg.pop("transformers_version", None)
    cfg.pop("_name_or_path", None)
    write_json(dst / "config.json", cfg)
    tokenizer.save_pretrained(str(dst))
    write_portable_tokenizer_config(dst)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    _save_generation_config(dst, [eos, eot], eot, eot)


def build_tiny(out: Path, seed: int = 0, perturb: float | None = None,
               silent_layers: int = 0) -> TinyModels:
    """Build the tiny tokenizer, target, 1-layer draft and (with `perturb`) an updated target.

    ``silent_layers`` appends layers to the target that compute but add nothing to the residual
    stream (copies of the first layers with zero output projections): the same tokens and
    acceptance, at a target step several times its draft's, as with real targets.

    Deterministic: the same seed gives byte-identical weights and the same fingerprints. Each
    model directory is written into a temp dir and renamed into place (replacing an old build).
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(tiny_prompt_texts())
    config = _tiny_config(tokenizer)

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    _shape_tiny_weights(model, config, generator)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if silent_layers:
        config, state = _with_silent_layers(config, state, silent_layers)

    target = out / "target"
    with atomic_dir(target) as tmp:
        _save_state(state, config, tokenizer, tmp)
    draft = draft_init(target, 1, out / "draft", overwrite=True)

    updated = None
    if perturb is not None:
        noise_gen = torch.Generator().manual_seed(seed + 1_000_003)
        noisy = {}
        for name in sorted(state):
            t = state[name]
            noise = torch.randn(t.shape, generator=noise_gen, dtype=t.dtype)
            noisy[name] = t + noise * (float(perturb) * t.std().item() if t.numel() > 1 else 0.0)
        updated = out / "target-updated"
        with atomic_dir(updated) as tmp:
            _save_state(noisy, config, tokenizer, tmp)
    return TinyModels(root=out, target=target, draft=draft, target_updated=updated)


def teacher_forced_agreement(
    target: Path, draft: Path, prompts: list[str], max_new_tokens: int = 64
) -> dict[str, float]:
    """Greedy acceptance proxy: how often the draft's argmax equals the target's greedy token.

    The target generates `max_new_tokens` greedily from each chat-formatted prompt; the draft then
    reads the same sequences and its argmax at each generated position is compared with the
    target's token. Returns {"agreement", "mean_new_tokens", "eos_fraction"}.
    """
    import torch

    tok = load_tokenizer(target)
    t_model, d_model = load_causal_lm(target), load_causal_lm(draft)
    agree = total = new_tokens = eos_stops = 0
    for prompt in prompts:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.no_grad():
            seq = t_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            n_prompt, n_new = ids.shape[1], seq.shape[1] - ids.shape[1]
            d_pred = d_model(seq).logits[0, n_prompt - 1 : -1].argmax(-1)
        gen = seq[0, n_prompt:]
        agree += int((d_pred == gen).sum())
        total += n_new
        new_tokens += n_new
        eos_stops += int(n_new < max_new_tokens)
    return {
        "agreement": agree / max(total, 1),
        "mean_new_tokens": new_tokens / max(len(prompts), 1),
        "eos_fraction": eos_stops / max(len(prompts), 1),
    }
