"""The DBRX tokenizer: tiktoken's cl100k_base BPE plus DBRX's special tokens, the
instruct chat template, and a streaming detokenizer.

DBRX was trained with tiktoken's ``cl100k_base`` ranks (ids 0..100255) and these
special tokens (``DBRX_SPECIAL_TOKENS``): ``<|endoftext|>`` 100257, the fim tokens
100258-100260, ``<|endofprompt|>`` 100276, ``<|pad|>`` 100277, ``<|im_start|>``
100278, ``<|im_end|>`` 100279. Instruct models stop at ``[100257, 100279]``; no BOS
is ever added. The model's embedding has 100352 rows (padded); ids without a token
decode to nothing.

Nothing here touches the network. ``DbrxTokenizer.from_pretrained(folder)`` looks
for a vocabulary in this order and takes the first it finds:

1. ``tokenizer.tiktoken`` + ``tokenizer.tiktoken.json`` in the folder: our own
   format for small checkpoints (written by ``dbrxq.text.vocab.write_vocab``).
   ``tokenizer.tiktoken`` holds tiktoken's lines ``<base64 token bytes> <rank>``;
   the JSON sidecar holds ``special_tokens`` (name -> id, required) and optionally
   ``pat_str`` (default: cl100k_base's), ``eos_token_ids`` (default: the ids of
   ``<|endoftext|>`` and ``<|im_end|>``), ``pad_token_id`` (default: ``<|pad|>``'s),
   and, for people only, ``format`` ("dbrxq-tiktoken-v1") and ``provenance``.
2. ``cl100k_base.tiktoken`` in the folder (checked against its sha256), with
   DBRX's special tokens at their real ids.
3. ``tokenizer.json`` in the folder: the GPT2-style Hugging Face file newer DBRX
   uploads ship. Byte-level BPE tokens are mapped back to bytes and their ids used
   as tiktoken ranks (after checking that the ids follow the merge order);
   ``added_tokens`` become the special tokens.
4. cl100k_base in tiktoken's own cache (``$TIKTOKEN_CACHE_DIR``, else
   ``$DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``; the file is named by the
   sha1 of its URL). We read the file ourselves, so a missing or corrupt cache
   raises :class:`TokenizerError` instead of making tiktoken fetch it.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import tiktoken

from dbrxq.core.errors import TokenizerError
from dbrxq.core.untrusted import (
    MAX_CONFIG_BYTES,
    MAX_TOKENIZER_BYTES,
    check_int,
    check_type,
    read_bytes,
    read_json,
)

logger = logging.getLogger(__name__)

# tiktoken 0.14's cl100k_base split pattern (tiktoken_ext/openai_public.py).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# The same split written without possessive quantifiers, as in tiktoken < 0.8: Hugging
# Face's regex engine (Oniguruma) reads ``{1,3}+`` as "repeat", not "possessive".
CL100K_PATTERN_HF = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Text a tokenizer's own split pattern must handle at load (prose, code, digits, runs of spaces and
# letters, non-Latin script): a pattern whose regex engine gives up on this would fail on prompts.
PATTERN_PROBE = ("The quick brown fox's 3 jumps, 1234567 times!\n\n    def f(x):\n\treturn x**2  # ok?\r\n"
                 "naïve café — 東京 ü 😀 " + "ab " * 40 + "a" * 64 + "!" + "1" * 64 + "x" + " " * 64 + "x\n\n\n")
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# Order matters: small vocabularies put these right after their BPE ranks, in this order.
DBRX_SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
    "<|pad|>": 100277,
    "<|im_start|>": 100278,
    "<|im_end|>": 100279,
}
EOS_TOKENS = ("<|endoftext|>", "<|im_end|>")
PAD_TOKEN = "<|pad|>"

VOCAB_FILE = "tokenizer.tiktoken"
MAX_VOCAB = 1 << 22  # token ids, as DbrxConfig bounds vocab_size
SIDECAR_FILE = "tokenizer.tiktoken.json"
CL100K_FILE = "cl100k_base.tiktoken"
HF_TOKENIZER_FILE = "tokenizer.json"

# The default system prompt of databricks/dbrx-instruct's chat_template (tokenizer_config.json).
DEFAULT_SYSTEM_PROMPT = (
    "You are DBRX, created by Databricks. You were last updated in December 2023. "
    "You answer questions based on information available up to that point.\n"
    "YOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough "
    "responses to more complex and open-ended questions.\n"
    "You assist with various tasks, from writing to coding (using markdown for code blocks "
    "\u2014 remember to use ``` with code, JSON, and tables).\n"
    "(You do not have real-time data access or code execution capabilities. You avoid "
    "stereotyping and provide balanced perspectives on controversial topics. You do not "
    "provide song lyrics, poems, or news articles and do not divulge details of your "
    "training data.)\n"
    "This is your system prompt, guiding your responses. Do not reference it, just respond "
    "to the user. If you find yourself talking about this message, stop. You should be "
    "responding appropriately and usually that means not mentioning this.\n"
    "YOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS "
    "DIRECTLY PERTINENT TO THE USER'S QUERY."
)


class DbrxTokenizer:
    """tiktoken encoder with DBRX's special tokens, eos/pad ids and chat template."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        *,
        pat_str: str = CL100K_PATTERN,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        source: str = "<memory>",
    ) -> None:
        """Build from tiktoken ranks; ``source`` names the file in error messages."""
        _check_vocab(mergeable_ranks, special_tokens, source)
        if eos_token_ids is None:
            eos_token_ids = [special_tokens[t] for t in EOS_TOKENS if t in special_tokens]
        if pad_token_id is None:
            pad_token_id = special_tokens.get(PAD_TOKEN)
        known = set(mergeable_ranks.values()) | set(special_tokens.values())
        for i in [*eos_token_ids, *([] if pad_token_id is None else [pad_token_id])]:
            if i not in known:
                raise TokenizerError(f"{source}: eos/pad id {i} is not a token of the vocabulary")
        try:
            self._enc = tiktoken.Encoding(
                name=f"dbrxq:{source}",
                pat_str=pat_str,
                mergeable_ranks=mergeable_ranks,
                special_tokens=special_tokens,
            )
        except ValueError as e:  # e.g. a pattern the Rust regex engine rejects
            raise TokenizerError(f"{source}: tiktoken rejected the vocabulary: {e}") from e
        if pat_str != CL100K_PATTERN:  # a pattern of the file's own: it must split ordinary text
            try:
                self._enc.encode(PATTERN_PROBE, disallowed_special=())
            except ValueError as e:
                raise TokenizerError(f"{source}: its split pattern (pat_str) fails on ordinary text "
                                     f"({str(e).splitlines()[0][:120]}); refused") from None
        self._special = dict(special_tokens)
        self._ranks = mergeable_ranks
        self.pat_str = pat_str
        self._eos = list(eos_token_ids)
        self._pad = pad_token_id
        self.source = source
        # Our own id -> bytes table: decode() and StreamDecoder must tolerate the model's
        # padding ids (vocab_size 100352 > tokenizer), which tiktoken would reject.
        self._id_to_bytes = {i: b for b, i in mergeable_ranks.items()}
        self._id_to_bytes.update({i: s.encode() for s, i in special_tokens.items()})

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | Path) -> DbrxTokenizer:
        """Load the vocabulary of a checkpoint folder (order in the module docstring).

        Raises:
            TokenizerError: the folder is missing, or no vocabulary was found, or the
                one found cannot be read.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a directory; expected a checkpoint folder")
        def present(name: str) -> bool:  # a link counts (and is then checked), even a dangling one
            return (folder / name).exists() or (folder / name).is_symlink()
        if present(VOCAB_FILE):
            return _load_own(folder)
        if present(CL100K_FILE):
            return _load_cl100k(folder / CL100K_FILE, folder)
        if present(HF_TOKENIZER_FILE):
            return _load_hf_json(folder / HF_TOKENIZER_FILE, folder)
        cached = _cl100k_cache_path()
        if cached is not None and cached.is_file():
            return _load_cl100k(cached)
        raise TokenizerError(
            f"{folder}: no tokenizer vocabulary: looked for {VOCAB_FILE}, {CL100K_FILE} and "
            f"{HF_TOKENIZER_FILE} there and for cl100k_base in the tiktoken cache "
            f"({cached or 'disabled: TIKTOKEN_CACHE_DIR is empty'}); copy cl100k_base.tiktoken "
            f"(sha256 {CL100K_SHA256[:12]}..., from {CL100K_URL}) into the folder, or set "
            f"TIKTOKEN_CACHE_DIR to a folder where tiktoken has cached it"
        )

    # ------------------------------------------------------------- properties
    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation (``[100257, 100279]`` for DBRX)."""
        return list(self._eos)

    @property
    def pad_token_id(self) -> int | None:
        """Id of ``<|pad|>`` (100277 for DBRX), or None if the vocabulary has none."""
        return self._pad

    @property
    def vocab_size(self) -> int:
        """Highest token id + 1, special tokens included (100280 for DBRX, whose ids have
        gaps; the model pads its embedding further, to 100352)."""
        return self._enc.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        return dict(self._special)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """The BPE vocabulary: token bytes -> rank (= id); not a copy, do not modify."""
        return self._ranks

    # ------------------------------------------------------- encode / decode
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; no BOS is added.

        Special-token text (``<|im_end|>``) in ``text`` is encoded as ordinary text
        unless ``allow_special``, so user input cannot forge turn boundaries.
        """
        try:
            if allow_special:
                return self._enc.encode(text, allowed_special="all")
            return self._enc.encode(text, allowed_special=set(), disallowed_special=())
        except ValueError as e:  # the split pattern's regex engine gave up (backtracking limit)
            raise TokenizerError(f"{self.source}: its split pattern (pat_str) cannot tokenize this text "
                                 f"({str(e).splitlines()[0][:120]}); the tokenizer is unusable") from None

    def decode_bytes(self, ids: Iterable[int], *, skip_special: bool = False) -> bytes:
        """Raw bytes of ``ids``; ids with no token (model padding) give nothing."""
        special = set(self._special.values()) if skip_special else ()
        get = self._id_to_bytes.get
        return b"".join(get(int(i), b"") for i in ids if int(i) not in special)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", "replace")

    # ---------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        system_prompt: str | None = None,
        tokenize: bool = True,
    ) -> list[int] | str:
        """DBRX instruct's ChatML prompt for ``messages`` (dicts with role, content).

        Mirrors the chat_template of databricks/dbrx-instruct: a leading system
        message, else ``system_prompt`` ("" for none), else ``DEFAULT_SYSTEM_PROMPT``, is stripped
        and rendered as ``<|im_start|>system\\n...<|im_end|>\\n``; every turn is
        ``<|im_start|>role\\ncontent<|im_end|>``, turns joined by ``\\n``; the
        generation prompt is ``\\n<|im_start|>assistant\\n``. With ``tokenize`` the
        ChatML markers become their ids and message contents are encoded without
        parsing special-token text, which gives the same ids as encoding the string
        with ``allow_special`` whenever the contents hold no special-token text.
        """
        pieces = _chat_pieces(messages, add_generation_prompt, system_prompt)
        if not tokenize:
            return "".join(text for text, _ in pieces)
        ids: list[int] = []
        for text, is_special in pieces:
            if is_special:
                if text not in self._special:
                    raise TokenizerError(f"{self.source}: the vocabulary has no {text} token")
                ids.append(self._special[text])
            else:
                ids.extend(self.encode(text))
        return ids


class StreamDecoder:
    """Turns generated ids into text as they arrive.

    A character whose UTF-8 bytes span several tokens is held back until its last
    byte arrives, so concatenating every ``push`` and the final ``flush`` equals
    ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: DbrxTokenizer, *, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (may be empty)."""
        data = self._tok.decode_bytes([token_id], skip_special=self._skip_special)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: return what is held back (U+FFFD for a cut-off character)."""
        return self._utf8.decode(b"", final=True)


# ------------------------------------------------------------------ chat pieces
def _chat_pieces(
    messages: list[dict], add_generation_prompt: bool, system_prompt: str | None
) -> list[tuple[str, bool]]:
    """The chat prompt as (text, is_special_token) pieces, adjacent texts merged."""
    if not messages:
        raise TokenizerError("apply_chat_template: messages is empty")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TokenizerError(f"apply_chat_template: expected {{'role': str, 'content': str}}, got {m!r:.80}")
    # The three branches of the reference template, including its quirk that a role
    # merely containing 'system' (not equal to it) suppresses the system turn.
    if messages[0]["role"] == "system":
        system, turns = messages[0]["content"], messages[1:]
    elif "system" not in messages[0]["role"]:
        system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt or None  # "": no system turn
        turns = messages
    else:
        system, turns = None, messages
    out: list[tuple[str, bool]] = []

    def text(s: str) -> None:
        if out and not out[-1][1]:
            out[-1] = (out[-1][0] + s, False)
        else:
            out.append((s, False))

    def special(s: str) -> None:
        out.append((s, True))

    # Like the reference, a conversation with only a system message renders nothing.
    for i, m in enumerate(turns):
        if i == 0 and system is not None:  # jinja's `| trim` is str.strip()
            special("<|im_start|>")
            text("system\n" + system.strip())
            special("<|im_end|>")
            text("\n")
        if i > 0:
            text("\n")
        special("<|im_start|>")
        text(m["role"] + "\n" + m["content"])
        special("<|im_end|>")
        if add_generation_prompt and i == len(turns) - 1:
            text("\n")
            special("<|im_start|>")
            text("assistant\n")
    return out


# ---------------------------------------------------------------- vocab readers
@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:  # unprintable bytes are moved to code points 256+
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_tiktoken_file(path: str | Path, folder: Path | None = None) -> dict[bytes, int]:
    """Parse tiktoken's ``<base64 token> <rank>`` lines (a regular file of at most 64 MiB, inside
    ``folder`` when given)."""
    path = Path(path)
    return _parse_tiktoken(read_bytes(path, MAX_TOKENIZER_BYTES, folder=folder, error=TokenizerError), path)


def _parse_tiktoken(data: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            tok, r = base64.b64decode(token, validate=True), int(rank)
            if not 0 <= r < MAX_VOCAB or len(rank) > 7:
                raise ValueError(rank)
        except ValueError as e:  # binascii.Error is a ValueError
            raise TokenizerError(f"{path}:{n}: expected '<base64 token> <rank>' with a rank below {MAX_VOCAB}, "
                                 f"got {line[:60]!r}") from e
        if tok in ranks:
            raise TokenizerError(f"{path}:{n}: token {tok[:30]!r} is listed twice (ranks {ranks[tok]} and {r}); "
                                 f"refused (one of the ranks would vanish)")
        ranks[tok] = r
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    return ranks


def _load_own(folder: Path) -> DbrxTokenizer:
    vocab, sidecar = folder / VOCAB_FILE, folder / SIDECAR_FILE
    if not (sidecar.exists() or sidecar.is_symlink()):
        raise TokenizerError(f"{sidecar}: missing; {vocab} needs this JSON sidecar (special_tokens, eos, pad)")
    meta = read_json(sidecar, MAX_CONFIG_BYTES, folder=folder, error=TokenizerError)
    where = str(sidecar)
    check_type(meta, dict, "(top level)", where, "an object", error=TokenizerError)
    special = check_type(meta.get("special_tokens"), dict, "special_tokens", where, "an object", error=TokenizerError)
    for k, v in special.items():
        check_int(v, f"special_tokens[{k!r:.30}]", where, lo=0, hi=MAX_VOCAB - 1, error=TokenizerError)
    eos = check_type(meta.get("eos_token_ids"), list, "eos_token_ids", where, "a list", null=True, error=TokenizerError)
    for i, e in enumerate(eos or []):
        check_int(e, f"eos_token_ids[{i}]", where, lo=0, hi=MAX_VOCAB - 1, error=TokenizerError)
    pad = check_int(meta.get("pad_token_id"), "pad_token_id", where, lo=0, hi=MAX_VOCAB - 1, null=True,
                    error=TokenizerError)
    pat_str = check_type(meta.get("pat_str", CL100K_PATTERN), str, "pat_str", where, "a string", error=TokenizerError)
    logger.info("tokenizer: %s (%s)", vocab, meta.get("provenance", "no provenance"))
    return DbrxTokenizer(
        read_tiktoken_file(vocab, folder), special, pat_str=pat_str, eos_token_ids=eos,
        pad_token_id=pad, source=str(vocab),
    )


def _load_cl100k(path: Path, folder: Path | None = None) -> DbrxTokenizer:
    data = read_bytes(path, MAX_TOKENIZER_BYTES, folder=folder, error=TokenizerError)
    if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
        raise TokenizerError(
            f"{path}: not tiktoken's cl100k_base file (sha256 differs from {CL100K_SHA256[:12]}...); "
            f"replace it, or ship a smaller vocabulary as {VOCAB_FILE} + {SIDECAR_FILE}"
        )
    logger.info("tokenizer: cl100k_base from %s", path)
    return DbrxTokenizer(_parse_tiktoken(data, path), DBRX_SPECIAL_TOKENS, source=str(path))


def _cl100k_cache_path() -> Path | None:
    """Where tiktoken caches cl100k_base (same rules as tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":  # tiktoken's "caching disabled"
        return None
    return Path(cache_dir) / hashlib.sha1(CL100K_URL.encode()).hexdigest()


def _load_hf_json(path: Path, folder: Path | None = None) -> DbrxTokenizer:
    """Rebuild tiktoken ranks from a GPT2-style byte-level BPE tokenizer.json."""
    data = read_json(path, MAX_TOKENIZER_BYTES, folder=folder, error=TokenizerError)
    where = str(path)
    check_type(data, dict, "(top level)", where, "an object", error=TokenizerError)
    model = check_type(data.get("model"), dict, "model", where, "an object", error=TokenizerError)
    vocab: dict[str, int] = check_type(model.get("vocab"), dict, "model.vocab", where, "an object",
                                       error=TokenizerError)
    merges = check_type(model.get("merges") or [], list, "model.merges", where, "a list", error=TokenizerError)
    added = {}
    for i, t in enumerate(check_type(data.get("added_tokens") or [], list, "added_tokens", where, "a list",
                                     error=TokenizerError)):
        check_type(t, dict, f"added_tokens[{i}]", where, "an object", error=TokenizerError)
        content = check_type(t.get("content"), str, f"added_tokens[{i}].content", where, "a string",
                             error=TokenizerError)
        added[content] = check_int(t.get("id"), f"added_tokens[{i}].id", where, lo=0, hi=MAX_VOCAB - 1,
                                   error=TokenizerError)
    bad = next((t for t, i in vocab.items() if type(i) is not int or not 0 <= i < MAX_VOCAB), None)
    if bad is not None:
        check_int(vocab[bad], f"model.vocab[{bad!r:.30}]", where, lo=0, hi=MAX_VOCAB - 1, error=TokenizerError)
    if model.get("type", "BPE") != "BPE":
        raise TokenizerError(f"{path}: model type {model.get('type')!r}, expected byte-level 'BPE'")
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, i in vocab.items():
        if token in added:
            continue
        try:
            ranks[bytes(decoder[c] for c in token)] = i
        except KeyError:
            raise TokenizerError(f"{path}: vocab token {token!r} is not GPT-2 byte-level text") from None
    _check_merge_order(ranks, merges, decoder, path)
    logger.info("tokenizer: %s (%d ranks, %d added tokens)", path, len(ranks), len(added))
    return DbrxTokenizer(ranks, added, pat_str=_hf_pattern(data, path), source=str(path))


# GGUF token types (llama.cpp's llama_token_type): what from_gguf_vocab takes each token as
GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED = 1, 3, 4, 5


def from_gguf_vocab(tokens: list, types: list, *, pre: str | None, eos: int | None, eot: int | None,
                    pad: int | None, source: str) -> DbrxTokenizer:
    """A GGUF file's byte-level BPE vocabulary (``tokenizer.ggml.tokens`` / ``token_type``, DBRX's
    ``dbrx`` pre-tokenizer) as a DbrxTokenizer: normal tokens are tiktoken ranks (their ids, as llama.cpp's
    DBRX converter and dbrxq's export write them), control and user-defined tokens special tokens, unused
    ids (padding rows) left out; ``eos`` and ``eot`` end generation."""
    if pre not in (None, "dbrx"):
        raise TokenizerError(f"{source}: tokenizer.ggml.pre is {pre!r}; DBRX's text is split by its 'dbrx' "
                             f"(cl100k_base) pattern")
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if not isinstance(tok, str) or type(kind) is not int:
            raise TokenizerError(f"{source}: token {i} is not a string with an integer type")
        if kind == GGUF_NORMAL:
            try:
                ranks[bytes(decoder[c] for c in tok)] = i
            except KeyError:
                raise TokenizerError(f"{source}: token {i} {tok!r:.40} is not GPT-2 byte-level text") from None
        elif kind in (GGUF_CONTROL, GGUF_USER_DEFINED):
            special[tok] = i
        elif kind != GGUF_UNUSED:
            raise TokenizerError(f"{source}: token {i} has type {kind}; a byte-level BPE has normal, control, "
                                 f"user-defined and unused tokens only")
    ends = [i for i in (eos, eot) if i is not None]
    return DbrxTokenizer(ranks, special, eos_token_ids=list(dict.fromkeys(ends)) or None, pad_token_id=pad,
                         source=source)


def _check_merge_order(ranks: dict[bytes, int], merges: list, decoder: dict[str, int], path: Path) -> None:
    """Check that the token ids can serve as tiktoken ranks for this merges list.

    tiktoken, given ranks, repeatedly merges the adjacent pair whose concatenation has the lowest
    rank; Hugging Face's BPE merges the adjacent pair listed first in ``merges``. The two choose the
    same token at every step exactly when the list is ordered by the id of the token each merge
    makes: if merge i made a higher id than a later merge j, an input holding both pairs would get
    i's token from Hugging Face and j's from tiktoken. So the condition tested is: every merge's
    halves and result are in the vocabulary, and result ids never decrease along the list.

    Not tested, because neither breaks that equivalence: (1) a half with a higher id than the
    result. transformers' TikTokenConverter lists EVERY split of each token whose halves are
    tokens (``'Ġ' + 'ĠĠĠ' -> 257`` while ``'ĠĠĠ'`` is 262); tiktoken would make that merge too,
    at rank 257, whenever those two tokens stand side by side. (2) Several merges making the same
    token: the converter lists all its splits, consecutively, each at that token's rank.
    A minimal (trained) list is accepted as well; multi-byte tokens no merge makes are only
    logged, since tiktoken can still reach them through a pair the list does not name.
    """
    if not merges:
        logger.warning("%s: no merges; trusting that token ids are BPE ranks", path)
        return
    previous = -1
    produced: set[bytes] = set()
    for n, merge in enumerate(merges):
        try:
            a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        except (ValueError, AttributeError, TypeError):
            raise TokenizerError(f"{path}: merge #{n} {merge!r:.60} is not 'a b' or [a, b]") from None
        try:
            ab = [bytes(decoder[c] for c in s) for s in (a, b)]
            ranks[ab[0]], ranks[ab[1]]
            r = ranks[ab[0] + ab[1]]
        except (KeyError, TypeError):
            raise TokenizerError(f"{path}: merge #{n} {a!r} + {b!r} uses or makes a token not in vocab") from None
        if r < previous:
            raise TokenizerError(
                f"{path}: merge #{n} {a!r} + {b!r} -> id {r} comes after a merge that makes id {previous}: "
                "merges are not in the order of the ids they make (BPE order), so the ids cannot serve as "
                "tiktoken ranks"
            )
        previous = r
        produced.add(ab[0] + ab[1])
    unreachable = sum(1 for t in ranks if len(t) > 1 and t not in produced)
    if unreachable:
        logger.warning("%s: %d multi-byte tokens have no merge; encodings may differ from HF", path, unreachable)


def _hf_pattern(data: dict, path: Path) -> str:
    """The split regex of a ``Split`` pre-tokenizer, else cl100k_base's (DBRX's)."""
    pre = data.get("pre_tokenizer") or {}
    stack = [pre]
    while stack:
        p = stack.pop()
        if p.get("type") == "Split" and isinstance(p.get("pattern"), dict) and "Regex" in p["pattern"]:
            return p["pattern"]["Regex"]
        stack.extend(reversed(p.get("pretokenizers") or []))
    # A bare ByteLevel pre-tokenizer implies GPT-2's regex, an artifact of converting
    # DBRX's tiktoken tokenizer; the model was trained on cl100k_base's split.
    logger.info("%s: no Split regex in pre_tokenizer; using cl100k_base's pattern", path)
    return CL100K_PATTERN


def _check_vocab(ranks: dict[bytes, int], special: dict[str, int], source: str) -> None:
    """What tiktoken needs but does not check (it panics or mis-encodes instead)."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{source}: {len(missing)} single bytes have no rank (first: {missing[0]}); "
                             "a byte-level BPE needs all 256")
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{source}: two tokens share a rank")
    clash = set(ranks.values()) & set(special.values())
    if clash or len(set(special.values())) != len(special):
        raise TokenizerError(f"{source}: special token ids collide with ranks or each other: "
                             f"{sorted(clash)[:5] or special}")
