"""Making small byte-level BPE vocabularies for tiny checkpoints.

- ``train_bpe``: learn tiktoken ranks from a text (deterministic, incremental pair
  counts, so a few thousand merges over ~0.5 MB of text take seconds).
- ``restrict_ranks``: cl100k_base cut to its lowest ranks; since every token of a
  BPE is built from lower-ranked tokens, the cut is itself a valid BPE.
- ``write_vocab``: write ``tokenizer.tiktoken`` + ``tokenizer.tiktoken.json`` (the
  format ``dbrxq.text.tokenizer`` reads; see its docstring), with DBRX's special-token
  names at the ids right after the ranks.
- ``to_hf_tokenizer_json``: the same vocabulary as a GPT2-style Hugging Face
  ``tokenizer.json`` (used by tests of the tokenizer.json path, and for tools that
  want one).
"""

from __future__ import annotations

import base64
import heapq
import json
import logging
from collections import Counter
from pathlib import Path

import regex

from dbrxq.core.errors import TokenizerError
from dbrxq.text.tokenizer import (
    CL100K_PATTERN,
    CL100K_PATTERN_HF,
    DBRX_SPECIAL_TOKENS,
    EOS_TOKENS,
    PAD_TOKEN,
    SIDECAR_FILE,
    VOCAB_FILE,
    bytes_to_unicode,
)

logger = logging.getLogger(__name__)


def train_bpe(text: str, vocab_size: int, pat_str: str = CL100K_PATTERN, *, min_count: int = 2) -> dict[bytes, int]:
    """Learn a byte-level BPE on ``text``: ranks 0-255 are the bytes, then one rank per merge.

    Args:
        text: training text; split into chunks by ``pat_str`` first, so no token
            crosses a chunk boundary (as in tiktoken).
        vocab_size: number of ranks wanted (>= 256), special tokens not included.
        min_count: stop early when the most frequent pair occurs fewer times.

    Returns:
        token bytes -> rank, ranks contiguous from 0. Ties between equally frequent
        pairs go to the pair of lowest ids, so the result depends on the text only.
    """
    assert vocab_size >= 256, vocab_size
    chunks = Counter(regex.findall(pat_str, text))
    words = [list(w.encode("utf-8")) for w in chunks]
    freqs = list(chunks.values())
    tokens = [bytes([b]) for b in range(256)]
    ids = {t: i for i, t in enumerate(tokens)}

    counts: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            counts[pair] += f
            where.setdefault(pair, set()).add(w)
    # Max-heap by count via (-count, a, b); stale entries are skipped when popped.
    heap = [(-c, a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)

    while len(tokens) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        if counts.get((a, b), 0) != -neg:
            continue
        if -neg < min_count:
            break
        merged = tokens[a] + tokens[b]
        if merged not in ids:  # two pair paths can spell the same bytes: keep one rank
            ids[merged] = len(tokens)
            tokens.append(merged)
        new = ids[merged]
        touched: set[tuple[int, int]] = set()
        for w in sorted(where.pop((a, b), ())):
            word, f = words[w], freqs[w]
            for pair in zip(word, word[1:]):
                counts[pair] -= f
                touched.add(pair)
                where.get(pair, set()).discard(w)
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[w] = out
            for pair in zip(out, out[1:]):
                counts[pair] += f
                touched.add(pair)
                where.setdefault(pair, set()).add(w)
        counts.pop((a, b), None)
        for pair in touched:
            c = counts.get(pair, 0)
            if c > 0:
                heapq.heappush(heap, (-c, *pair))
            else:
                counts.pop(pair, None)
    if len(tokens) < vocab_size:
        logger.warning("train_bpe: text supports only %d ranks of the %d asked", len(tokens), vocab_size)
    return {t: i for i, t in enumerate(tokens)}


def restrict_ranks(ranks: dict[bytes, int], size: int) -> dict[bytes, int]:
    """The tokens of rank < ``size``; ranks must be contiguous from 0 (like cl100k_base)."""
    out = {t: r for t, r in ranks.items() if r < size}
    assert len(out) == size, f"ranks are not contiguous below {size}: {len(out)} tokens"
    missing = [b for b in range(256) if bytes([b]) not in out]
    assert not missing, f"single bytes {missing[:5]}... rank >= {size}"
    return out


def dbrx_specials_after(n_ranks: int) -> dict[str, int]:
    """DBRX's special-token names with ids n_ranks, n_ranks+1, ... in DBRX's order."""
    return {name: n_ranks + i for i, name in enumerate(DBRX_SPECIAL_TOKENS)}


def write_vocab(
    folder: str | Path,
    ranks: dict[bytes, int],
    *,
    pat_str: str = CL100K_PATTERN,
    provenance: str = "",
) -> dict[str, int]:
    """Write ``tokenizer.tiktoken`` and its JSON sidecar into ``folder``.

    Returns:
        the special tokens written (DBRX's names, ids right after the ranks).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = max(ranks.values()) + 1
    special = dbrx_specials_after(n)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (folder / VOCAB_FILE).write_text("\n".join(lines) + "\n", encoding="ascii")
    meta = {
        "format": "dbrxq-tiktoken-v1",
        "provenance": provenance,
        "pat_str": pat_str,
        "special_tokens": special,
        "eos_token_ids": [special[t] for t in EOS_TOKENS],
        "pad_token_id": special[PAD_TOKEN],
    }
    (folder / SIDECAR_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return special


def _bpe_halves(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two parts BPE joins last to make ``token``: merge its bytes with the ranks
    below the token's own until two parts remain (as tiktoken-to-HF converters do)."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            raise TokenizerError(f"token {token!r} (rank {limit}) cannot be built by merging tokens of lower rank, "
                                 f"so it has no BPE merge")
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """GPT-2 style merges, one per multi-byte token in rank order: merging by merge priority then
    gives the same tokens as tiktoken's merging by rank."""
    return [_bpe_halves(ranks, t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]


def to_hf_tokenizer_json(ranks: dict[bytes, int], special: dict[str, int], pat_str: str = CL100K_PATTERN) -> dict:
    """A GPT2-style byte-level BPE ``tokenizer.json`` (token id = tiktoken rank).

    cl100k_base's pattern is written in its Oniguruma-safe spelling (``CL100K_PATTERN_HF``).
    """
    if pat_str == CL100K_PATTERN:
        pat_str = CL100K_PATTERN_HF
    b2u = bytes_to_unicode()

    def text(t: bytes) -> str:
        return "".join(b2u[b] for b in t)

    merges = [[text(a), text(b)] for a, b in bpe_merges(ranks)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s, i in sorted(special.items(), key=lambda kv: kv[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pat_str}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            # Special tokens sit in the vocab too, as in real GPT2 files: Hugging Face
            # renumbers added tokens that the model's vocab lacks.
            "vocab": {**{text(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])}, **special},
            "merges": merges,
        },
    }
