"""Generation: sampling rules, stop tokens, streaming, refusals; the Python API on the embedded model."""

import pytest
import torch

import dbrxq
from dbrxq.core.errors import GenerationError
from dbrxq.runtime.generate import generate, sample


def test_sample_rules():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert sample(logits).item() == 1  # greedy
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, temperature=1.0, top_k=1, generator=g).item() for _ in range(20)} == {1}
    # top_p just above the top token's mass keeps exactly the two best tokens
    p = torch.softmax(logits, -1)[0]
    draws = {sample(logits, temperature=1.0, top_p=float(p[1]) + 1e-3, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample(logits, temperature=1.0, top_p=float(p[1]) - 1e-3, generator=g).item() for _ in range(50)}
    assert draws == {1}


def test_sampling_is_seeded_and_greedy_is_default(tiny_model):
    m = tiny_model()
    prompt = [[1, 2, 3]]
    a = generate(m, prompt, max_new_tokens=15, temperature=1.0, seed=5).sequences
    b = generate(m, prompt, max_new_tokens=15, temperature=1.0, seed=5).sequences
    c = generate(m, prompt, max_new_tokens=15, temperature=1.0, seed=6).sequences
    assert a == b and a != c
    greedy = generate(m, prompt, max_new_tokens=15).sequences
    assert greedy == generate(m, prompt, max_new_tokens=15, temperature=1.0, top_k=1, seed=9).sequences


def test_stop_tokens_end_each_row_and_are_kept(tiny_model):
    m = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    free = generate(m, prompts, max_new_tokens=12).sequences
    stop = free[0][3]
    out = generate(m, prompts, max_new_tokens=12, stop_tokens=[stop]).sequences
    assert out[0] == free[0][: free[0].index(stop) + 1]
    if stop in free[1]:
        assert out[1] == free[1][: free[1].index(stop) + 1]
    else:
        assert out[1] == free[1]


def test_streaming_callback_sees_every_token(tiny_model):
    m = tiny_model()
    seen = []
    out = generate(m, [[7, 8]], max_new_tokens=9, on_token=lambda t: seen.append(int(t[0])))
    assert seen == out.sequences[0]
    assert out.stats.prompt_tokens == 2 and out.stats.decode_steps == 8


@pytest.mark.parametrize("prompts, n, message", [
    ([[1] * 30], 11, "exceeds the model's context of 40 tokens"),
    ([[]], 5, "empty prompt"),
    ([[1]], 0, "max_new_tokens must be >= 1"),
])
def test_refusals_before_any_work(prompts, n, message, tiny_model):
    m = tiny_model()
    with pytest.raises(GenerationError, match=message):
        generate(m, prompts, max_new_tokens=n)


def test_api_on_embedded_model_is_deterministic():
    m = dbrxq.load()
    assert m.model.config.vocab_size == m.tokenizer.vocab_size
    a = m.generate("def f(x):", max_new_tokens=12, temperature=0.8, seed=1)
    assert a == m.generate("def f(x):", max_new_tokens=12, temperature=0.8, seed=1)
    pieces = []
    b = m.generate("def f(x):", max_new_tokens=12, temperature=0.8, seed=1, on_text=pieces.append)
    assert b == a and "".join(pieces) == a
    batch = m.generate(["def f(x):", "Hello"], max_new_tokens=12)
    assert batch[0] == m.generate("def f(x):", max_new_tokens=12)
    reply = m.chat([{"role": "user", "content": "Hi"}], max_new_tokens=6)
    assert isinstance(reply, str)
