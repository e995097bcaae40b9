"""Text generation: ``sample``, ``prefill``, ``decode_one_token``, ``generate``.

A batch of prompts is left-padded; positions come from the attention mask (cumsum - 1), so each
row sees exactly the positions and keys it would see alone. The KV cache is allocated once for
prompt + max_new_tokens, and a request that does not fit the model's context is refused before
any work is done.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from dbrxq.core.errors import GenerationError
from dbrxq.model.kv_cache import cache_factory


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # summed over the batch, padding excluded
    new_tokens: int = 0  # generated tokens summed over the batch (stop tokens included)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Decode forward passes per second, per sequence (the first new token comes from prefill)."""
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # new tokens per prompt, stop token included when one was hit
    stats: GenerationStats = field(default_factory=GenerationStats)


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, V); temperature 0 is greedy. Returns (B,) int64."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class Penalties:
    """What llama.cpp, vLLM and the OpenAI API offer against repetition, applied to the logits before
    sampling (greedy included). ``repetition`` (llama.cpp's --repeat-penalty, transformers' and vLLM's
    repetition_penalty): a logit of a token already in the prompt or the output is divided by it when
    positive, multiplied when negative; 1 is off. ``presence`` and ``frequency`` (OpenAI's, in [-2, 2]):
    subtracted from a generated token's logit once, and once per time it was generated."""

    repetition: float = 1.0
    presence: float = 0.0
    frequency: float = 0.0

    @property
    def active(self) -> bool:
        return self.repetition != 1.0 or self.presence != 0.0 or self.frequency != 0.0

    def check(self) -> Penalties:
        r, p, f = self.repetition, self.presence, self.frequency
        if not (isinstance(r, (int, float)) and math.isfinite(r) and 0 < r <= MAX_REPETITION_PENALTY):
            raise GenerationError(f"repetition penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1 is off), got {r!r}")
        for name, v in (("presence", p), ("frequency", f)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and -2 <= v <= 2):
                raise GenerationError(f"{name} penalty must be between -2 and 2 (0 is off), got {v!r}")
        return self

    def apply(self, logits: torch.Tensor, seen: Sequence[Sequence[int]], generated: Sequence[Sequence[int]]) -> torch.Tensor:
        """logits (B, V) with row b penalized for ``seen[b]`` (prompt + output) and ``generated[b]``."""
        if not self.active:
            return logits
        logits = logits.float().clone()
        V = logits.shape[-1]
        for b in range(logits.shape[0]):
            row = logits[b]
            if self.repetition != 1.0 and len(seen[b]):
                ids = torch.tensor(sorted(set(seen[b])), dtype=torch.long, device=row.device)
                ids = ids[ids < V]
                x = row[ids]
                row[ids] = torch.where(x > 0, x / self.repetition, x * self.repetition)
            if (self.presence or self.frequency) and len(generated[b]):
                counts = torch.bincount(torch.tensor(generated[b], dtype=torch.long, device=row.device), minlength=V)[:V]
                row -= self.frequency * counts + self.presence * (counts > 0)
        return logits


NO_PENALTIES = Penalties()
MAX_REPETITION_PENALTY = 10.0


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids (B, T), attention_mask (B, T)) left-padded to the longest."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, T - len(p):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 mask -> positions (B, S): a real token's index among its row's real tokens."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, mask: torch.Tensor, cache, *, chunk_size: int = 512) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns the last position's logits (B, V)."""
    pos = positions_from_mask(mask)
    padded = bool((mask == 0).any())
    logits = None
    for s in range(0, ids.shape[1], chunk_size):
        e = min(s + chunk_size, ids.shape[1])
        out = model(ids[:, s:e], attention_mask=mask[:, :e] if padded else None, position_ids=pos[:, s:e],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    return logits


@torch.inference_mode()
def decode_one_token(model, token: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, cache):
    """token, pos (B,) -> logits (B, V) for the next position."""
    out = model(token[:, None], attention_mask=mask, position_ids=pos[:, None], past_key_values=cache,
                use_cache=True)
    return out.logits[:, -1]


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 100.0
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None) -> None:
    """Sampling settings, checked once (GenerationError, one line). temperature is 0 (greedy) or in
    [MIN_TEMPERATURE, MAX_TEMPERATURE]: below, logits / t overflows to inf and softmax gives NaN;
    above, sampling is uniform noise. seed: an integer in 0 .. 2**64 - 1, or None."""
    t = temperature
    if not (isinstance(t, (int, float)) and math.isfinite(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
        raise GenerationError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE:g}, "
                              f"got {t!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise GenerationError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX):
        raise GenerationError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")


def check_request(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> None:
    """What :func:`generate` refuses before any work (GenerationError, one line): an empty prompt, bad
    sampling settings, or prompt + max_new_tokens beyond the model's context. Callers that print
    before generating (the CLI echoes the prompt) check first."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("empty prompt: at least one token is needed (DBRX adds no BOS token)")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p, seed)
    ctx = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > ctx:
        raise GenerationError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = "
                              f"{longest + max_new_tokens} exceeds the model's context of {ctx} tokens")


def first_nonfinite(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> str | None:
    """A second, instrumented forward of ``ids`` (at most 512 positions) that names the first part
    of the model whose output holds NaN/Inf: the embedding, a layer's attention or experts, the final
    norm or the output head. Run only once logits came out non-finite."""
    t = model.transformer
    parts = [("the embedding", t.wte)]
    for i, b in enumerate(t.blocks):
        parts += [(f"layer {i}'s attention block (norm_1, attention, norm_2)", b.norm_attn_norm),
                  (f"layer {i}'s experts", b.ffn)]
    parts += [("the final norm", t.norm_f), ("the output head", model.lm_head or t.wte)]
    found: list[str] = []

    def hook(name):
        def f(module, args, out):
            outs = out if isinstance(out, tuple) else (out,)
            if not found and any(torch.is_tensor(o) and o.is_floating_point() and not bool(torch.isfinite(o).all())
                                 for o in outs):
                found.append(name)
        return f
    handles = [m.register_forward_hook(hook(n)) for n, m in parts if m is not None]
    try:
        with torch.inference_mode():
            x = ids[:, :512]
            model(input_ids=x, attention_mask=None if mask is None else mask[:, :512], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def check_logits(model, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Stop (GenerationError, one line) rather than sample from NaN/Inf logits, naming where they began."""
    if bool(torch.isfinite(logits).all()):
        return
    where = first_nonfinite(model, ids, mask)
    raise GenerationError(
        f"the model's output is not finite (NaN/Inf){f': it first appears in the output of {where}' if where else ''}; "
        f"the checkpoint's weights there hold non-finite values, or activations overflow {model.dtype}; "
        f"stopping instead of generating from it")


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_tokens: Sequence[int] = (), pad_token_id: int = 0,
             on_token: Callable[[torch.Tensor], bool | None] | None = None,
             prefill_chunk_size: int = 512,
             kv_cache: str | Callable[[int, int], object] | None = None,
             penalties: Penalties = NO_PENALTIES) -> GenerationOutput:
    """Generate up to max_new_tokens for each prompt (token id lists).

    Args:
        on_token: called with the (B,) tensor of tokens produced at each step (for streaming); a
            true return value ends generation there (a stop string was completed).
        kv_cache: a flavour name ("bf16", "int8"; see dbrxq.model.kv_cache) or a factory
            ``(batch_size, length) -> cache``; default: ``model.new_cache``.
        penalties: repetition / presence / frequency penalties (:class:`Penalties`), off by default.
    Raises:
        GenerationError: an empty prompt, or prompt + max_new_tokens beyond the model's context.
    """
    check_request(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=seed)
    penalties.check()
    device = model.device
    ids, mask = left_pad(prompts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    B, T = ids.shape
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    factory = kv_cache if callable(kv_cache) else cache_factory(model, kv_cache or "bf16")
    cache = factory(B, T + max_new_tokens)
    stats = GenerationStats(prompt_tokens=int(mask.sum()))
    padded = bool((mask == 0).any())

    t0 = time.perf_counter()
    logits = prefill(model, ids, mask, cache, chunk_size=prefill_chunk_size)
    check_logits(model, logits, ids, mask)  # reads the logits: on a GPU, waits for the prefill to finish
    stats.prefill_s = time.perf_counter() - t0

    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    pos = positions_from_mask(mask)[:, -1]
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        if penalties.active:
            logits = penalties.apply(logits, [list(p) + o for p, o in zip(prompts, out)], out)
        tok = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(tok[i]))
        stats.new_tokens += int((~done).sum())
        if on_token is not None and on_token(tok):
            break
        done |= torch.isin(tok, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        pos = pos + 1
        if padded:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        logits = decode_one_token(model, tok, pos, mask if padded else None, cache)
        check_logits(model, logits, ids, mask[:, :T] if padded else None)
        stats.decode_steps += 1
    stats.decode_s = time.perf_counter() - t0
    return GenerationOutput(sequences=out, stats=stats)
