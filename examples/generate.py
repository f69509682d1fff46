"""Generate with a retrofitted model: ``prepare`` -> ``model.compile(backend="attnres")`` -> ``generate``.

    python examples/generate.py                  # about 1 minute on a 2-core CPU, most of it Inductor compiling
    python examples/generate.py --save ckpt      # also save it (load with attnres_compile.from_pretrained)

A small Llama with random weights stands in for a pretrained checkpoint (swap
``build_llama`` for ``LlamaForCausalLM.from_pretrained(...)``). ``prepare``
adds the zero-initialized queries, so the retrofitted model generates exactly
the original model's tokens until its queries are trained. The model is
compiled *in place* because ``generate`` calls the model itself; the backend
rewrites the prefill graph and the decode graphs (one new token against the
KV cache). Block AttnRes needs no cache of its own: its depth-wise read mixes
each token's own block summaries.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attnres_compile


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (2 residual steps each)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--num-blocks", type=int, default=2, help="Block AttnRes blocks")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--save", default=None, help="directory to save the prepared model to")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_llama(layers: int, hidden: int, vocab: int) -> LlamaForCausalLM:
    """A small Llama with random weights: the stand-in for ``LlamaForCausalLM.from_pretrained``."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def left_padded_prompts(lengths: list[int], vocab: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids, attention_mask`` ``[len(lengths), max(lengths)]``: what a tokenizer with left padding returns."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,))
        mask[row, width - n:] = 1
    return ids, mask


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``[batch, prompt + new_tokens]`` greedy tokens (no early stop, so the lengths are comparable)."""
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=0)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.manual_seed(args.seed)
    model = build_llama(args.layers, args.hidden, args.vocab)
    ids, mask = left_padded_prompts([9, 5, 3], args.vocab)
    original = greedy(model, ids, mask, args.new_tokens)

    attnres_compile.prepare(model, (ids,), attnres_compile.AttnResConfig(num_blocks=args.num_blocks))
    backend = attnres_compile.AttnResBackend()  # the "attnres" backend, kept to count what it rewrote
    model.compile(backend=backend)  # in place: generate() calls model(...), which now runs the rewrite

    start = time.perf_counter()
    tokens = greedy(model, ids, mask, args.new_tokens)
    first = time.perf_counter() - start
    start = time.perf_counter()
    greedy(model, ids, mask, args.new_tokens)
    warm = time.perf_counter() - start

    print(f"retrofitted Llama: {args.layers} layers, hidden {args.hidden}, {model.attnres}")
    print(f"rewrote {len(backend.plans)} graphs (prefill, then decode against the KV cache)")
    print(f"first generate (compiling) {first:.1f} s; again {warm * 1e3:.0f} ms for "
          f"{ids.shape[0]} x {args.new_tokens} tokens")
    print(f"same tokens as the original model (zero-init queries): {torch.equal(tokens, original)}")
    for row in tokens.tolist():
        print("  ", row[ids.shape[1]:])
    if args.save:
        attnres_compile.save_pretrained(model, args.save)
        print(f"saved to {args.save}; load with attnres_compile.from_pretrained(LlamaForCausalLM, "
              f"{args.save!r}, (ids,))")
    return {"model": model, "tokens": tokens, "original": original, "graphs": len(backend.plans)}


if __name__ == "__main__":
    main()
