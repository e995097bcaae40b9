"""Quality of a model on held-out text: sliding-window perplexity, and KL / top-1 agreement of two
models (e.g. quantized vs float) on exactly the same windows.

The sliding window is the standard Hugging Face recipe ("Perplexity of fixed-length models"):
windows of ``window`` tokens start every ``stride`` tokens; each window scores only the
predictions the previous window did not make, so every token but the first (which nothing
predicts) is scored exactly once, and every scored token sees at least ``window - stride + 1``
tokens before it, except in the first window where it sees all tokens before it.
``stride == window`` gives disjoint windows; a smaller stride buys context with compute.

Windows are streamed one at a time and only their scored rows' logits are kept, so memory is
O(window * vocab) whatever the length of the text.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from dbrxq.core.errors import DbrxqError
from dbrxq.runtime.generate import check_logits


class DataError(DbrxqError, ValueError):
    """Evaluation text or window settings that cannot be used (empty, too short, stride > window)."""


def windows(n_tokens: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first) per window: the model reads tokens [begin, end) and the predictions made
    at positions [first, end) -- of tokens first+1 .. end -- are scored. Over all windows these
    tile the n_tokens - 1 predictions exactly once; begin <= first, and from the second window on
    first - begin >= window - stride, i.e. every scored token has at least window - stride + 1
    tokens of context.
    """
    if not 1 <= stride <= window:
        raise DataError(f"stride must be between 1 and window ({window}), got {stride}")
    n_pred = n_tokens - 1  # the last token predicts nothing inside the text
    prev_end = 0
    for begin in range(0, max(n_pred, 0), stride):
        end = min(begin + window, n_pred)
        yield begin, end, prev_end
        prev_end = end
        if end == n_pred:
            return


def _as_ids(token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise DataError(f"need at least 2 tokens to score one, got {ids.numel()}")
    return ids


@torch.inference_mode()
def _window_logprobs(model, ids: torch.Tensor, begin: int, end: int, first: int) -> torch.Tensor:
    """float32 log-probabilities (end - first, V) of the predictions made at positions [first, end)."""
    x = ids[begin:end].to(model.device)[None]  # (1, T)
    logits = model(input_ids=x, use_cache=False, logits_to_keep=end - first).logits[0]  # (end - first, V)
    check_logits(model, logits, x)
    return torch.log_softmax(logits.float(), dim=-1)


def perplexity(model, token_ids: Sequence[int] | torch.Tensor, *, window: int, stride: int,
               progress: bool = False) -> dict:
    """Sliding-window perplexity of `model` on one token sequence.

    Args:
        model: a DbrxForCausalLM (float or quantized), in eval mode.
        token_ids: the text's ids (at least 2).
        window: tokens the model reads at once (at most its max_seq_len).
        stride: step between windows (1 <= stride <= window).
        progress: show a tqdm bar over windows.

    Returns:
        ``{"ppl": exp(nll), "nll": mean negative log-likelihood in nats, "tokens": tokens scored}``.
    """
    ids = _as_ids(token_ids)
    spans = list(windows(ids.numel(), window, stride))
    total, count = 0.0, 0
    for begin, end, first in tqdm(spans, desc="perplexity", disable=not progress):
        logp = _window_logprobs(model, ids, begin, end, first)  # (k, V)
        target = ids[first + 1:end + 1].to(logp.device)  # (k,) the tokens predicted
        total += -logp.gather(1, target[:, None]).sum().item()
        count += end - first
    assert count == ids.numel() - 1, (count, ids.numel())
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


def compare(model_a, model_b, token_ids: Sequence[int] | torch.Tensor, *, window: int, stride: int,
            progress: bool = False) -> dict:
    """Evaluate two models on the same windows: perplexities, KL(A||B) and top-1 agreement.

    Args:
        model_a: the reference (e.g. the float model).
        model_b: the candidate (e.g. its quantized copy); same vocabulary.
        token_ids, window, stride, progress: as for :func:`perplexity`.

    Returns:
        ``{"ppl_a", "ppl_b", "nll_a", "nll_b", "mean_kl", "top1_agreement", "tokens"}`` where
        mean_kl is sum_v p_a(v) (log p_a(v) - log p_b(v)) in nats, averaged over scored tokens,
        and top1_agreement the fraction of scored tokens whose argmax is the same.
    """
    ids = _as_ids(token_ids)
    spans = list(windows(ids.numel(), window, stride))
    nll_a = nll_b = kl = 0.0
    agree = count = 0
    for begin, end, first in tqdm(spans, desc="compare", disable=not progress):
        la = _window_logprobs(model_a, ids, begin, end, first)  # (k, V)
        lb = _window_logprobs(model_b, ids, begin, end, first).to(la.device)
        if la.shape != lb.shape:
            raise DataError(f"the two models disagree on the vocabulary: {la.shape[-1]} vs {lb.shape[-1]} logits")
        target = ids[first + 1:end + 1].to(la.device)[:, None]  # (k, 1)
        nll_a += -la.gather(1, target).sum().item()
        nll_b += -lb.gather(1, target).sum().item()
        kl += (la.exp() * (la - lb)).sum().item()
        agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
        count += end - first
    return {"ppl_a": math.exp(nll_a / count), "ppl_b": math.exp(nll_b / count), "nll_a": nll_a / count,
            "nll_b": nll_b / count, "mean_kl": kl / count, "top1_agreement": agree / count, "tokens": count}
