"""The quickstart trains: queries move, loss falls, and a state_dict round trip restores the model."""

import io

import torch

import attnres_compile
import quickstart
from tiny_gpt import GPTConfig, TinyGPT

ARGS = ["--steps", "30", "--layers", "2", "--d-model", "32", "--batch", "8", "--seq", "32",
        "--num-blocks", "2", "--corpus-bytes", "200000", "--log-every", "10"]


def test_quickstart_trains_queries_and_round_trips_through_state_dict(tmp_path):
    checkpoint = tmp_path / "quickstart.pt"
    result = quickstart.main(ARGS + ["--save", str(checkpoint)])
    losses, model = result["losses"], result["model"]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss {first:.3f} -> {last:.3f}; validation {result['val_loss']:.3f}")
    assert last < first - 0.5
    queries = model.attnres.queries[0].detach()
    assert queries.abs().max() > 1e-3, "the queries must leave zero"

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = TinyGPT(GPTConfig(n_layer=2, n_head=4, d_model=32, max_len=32))
    idx = torch.randint(0, 256, (2, 32))
    attnres_compile.prepare(fresh, (idx,), attnres_compile.AttnResConfig(num_blocks=2))
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.attnres.queries[0], queries)
    with torch.no_grad():
        expected = torch.compile(model, backend="attnres")(idx)
        got = torch.compile(fresh, backend="attnres")(idx)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    restored, (ids,) = quickstart.trained_model(str(checkpoint))
    assert torch.equal(restored.attnres.queries[0], queries)
    assert restored.attnres.config == model.attnres.config
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(restored, backend="attnres")(ids), torch.compile(model, backend="attnres")(ids), rtol=0, atol=0
        )
