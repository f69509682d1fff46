"""Dynamic shapes: a prepared tiny GPT under backend "attnres" across batch sizes and sequence lengths."""

import torch

import attnres_compile
from attnres_compile import AttnResBackend
from zoo import VOCAB, set_random_queries, tiny_gpt

SEQUENCE_LENGTHS = (5, 9, 13, 17, 24)
BATCH_SIZES = (2, 3)


def _tokens(batch, seq):
    idx = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))
    # Batch and sequence are marked dynamic, as a user does for variable-length input.
    torch._dynamo.mark_dynamic(idx, 0)
    torch._dynamo.mark_dynamic(idx, 1)
    return idx


def test_five_lengths_and_two_batch_sizes_compile_at_most_twice_and_match_the_reference():
    model, args, _ = tiny_gpt()
    attnres_compile.prepare(model, args)
    set_random_queries(model)
    backend = AttnResBackend()
    compiled = torch.compile(model, backend=backend)
    reference = torch.compile(model, backend=AttnResBackend(inductor=False))
    with torch.no_grad():
        for batch in BATCH_SIZES:
            for seq in SEQUENCE_LENGTHS:
                idx = _tokens(batch, seq)
                torch.testing.assert_close(compiled(idx), reference(idx), rtol=1e-5, atol=1e-6)
    compiles = len(backend.plans)
    print(f"{len(BATCH_SIZES) * len(SEQUENCE_LENGTHS)} shapes: {compiles} compile(s), {compiles - 1} recompile(s)")
    assert 1 <= compiles <= 2
    assert all(len(plan.streams[0].layers) == 4 for plan in backend.plans)
