"""Calibration data: text in, ``(N, L)`` token windows out, deterministically.

Sources (``spec``):

- ``None``: the text shipped with dbrxq, ``calibration/data/calib.txt`` (PSF-licensed Python
  documentation, disjoint from ``heldout.txt``, which is for evaluation and never calibrates).
- a plain text file: documents are separated by two blank lines (``"\\n\\n\\n"``, the separator
  of calib.txt); a file without any is one document.
- a JSON Lines file (``*.jsonl``): one JSON object per line, the document in ``text_field``
  (default ``"text"``); blank lines are skipped.
- a hub dataset file ``hf://datasets/ORG/NAME[@REVISION]/PATH/IN/REPO``, fetched with
  ``huggingface_hub.hf_hub_download(repo_type="dataset")`` (cached; works offline once cached),
  then read by its suffix as above.

Sampling rule (:func:`sample_windows`): the documents are tokenized with the model's tokenizer
(special-token text is ordinary text), concatenated with one ``<|endoftext|>`` between documents
into one stream of T tokens, and N windows of L tokens are cut from it:

- T >= N*L: the stream is cut into ``T // L`` disjoint slots after a seeded shift in
  ``[0, T mod L]``; N distinct slots are drawn with a seeded permutation, in stream order. No token
  is seen twice.
- L <= T < N*L: N seeded random offsets in ``[0, T - L]``, sorted; windows overlap (a warning is
  logged and the summary says ``"overlap": true``), unless ``allow_overlap=False``.
- T < L: :class:`CalibrationDataError`.

Everything depends only on (file bytes, tokenizer, N, L, seed): the same call gives the same
tensor on any machine.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dbrxq.core.errors import DbrxqError
from dbrxq.core.untrusted import parse_json, read_bytes

log = logging.getLogger(__name__)

# Calibration reads a few hundred thousand tokens at most: a file beyond this is a mistake (or /dev/zero).
MAX_CALIB_BYTES = 1 << 30
DEFAULT_CALIB_FILE = Path(__file__).parent / "data" / "calib.txt"
DOC_SEPARATOR = "\n\n\n"
EOT_TOKEN = "<|endoftext|>"
HUB_PREFIX = "hf://datasets/"
_HUB_RE = re.compile(r"^hf://datasets/([\w.-]+/[\w.-]+?)(?:@([^/]+))?/(.+)$")

__all__ = ["CalibrationDataError", "CalibrationText", "load_text", "sample_windows", "calibration_tokens",
           "DEFAULT_CALIB_FILE"]


class CalibrationDataError(DbrxqError, ValueError):
    """Calibration data that is missing, unreadable, empty or too short."""


@dataclass(frozen=True)
class CalibrationText:
    """Documents read from one source, and what identifies that source."""

    documents: list[str]
    name: str  # what the user passed (or the packaged file's name)
    sha256: str  # of the raw file bytes: part of the run's identity (resume refuses a change)


def _hub_file(spec: str) -> Path:
    """Download (or find in the cache) ``hf://datasets/ORG/NAME[@REV]/PATH``."""
    m = _HUB_RE.match(spec)
    if not m:
        raise CalibrationDataError(f"--calib-data {spec}: expected hf://datasets/ORG/NAME[@REVISION]/PATH")
    repo, revision, filename = m.groups()
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision))
    except hf_errors.LocalEntryNotFoundError:
        raise CalibrationDataError(f"--calib-data {spec}: not in the local hub cache and the hub cannot be "
                                   f"reached (offline?)") from None
    except (hf_errors.HfHubHTTPError, hf_errors.HFValidationError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CalibrationDataError(f"--calib-data {spec}: download failed ({type(e).__name__}: {first})") from None


def _read_jsonl(path: Path, raw: bytes, text_field: str) -> list[str]:
    docs = []
    for i, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = parse_json(line.encode(), f"{path}:{i}", error=CalibrationDataError,
                         not_json=f"{path}:{i}: not a JSON object (expected JSON Lines)")
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise CalibrationDataError(f"{path}:{i}: no string field {text_field!r} "
                                       f"(choose the field with --calib-field)")
        docs.append(obj[text_field])
    return docs


def load_text(spec: str | Path | None = None, *, text_field: str = "text") -> CalibrationText:
    """Read the documents of a calibration source (see the module docstring).

    Raises:
        CalibrationDataError: missing or unreadable file, malformed JSON Lines, no text at all.
    """
    if spec is None:
        path, name = DEFAULT_CALIB_FILE, f"dbrxq:{DEFAULT_CALIB_FILE.name}"
    elif str(spec).startswith(HUB_PREFIX):
        path, name = _hub_file(str(spec)), str(spec)
    else:
        path, name = Path(spec).expanduser(), str(spec)
    raw = read_bytes(path, MAX_CALIB_BYTES, what=f"calibration data {path}", error=CalibrationDataError)
    try:
        if path.suffix == ".jsonl":
            docs = _read_jsonl(path, raw, text_field)
        else:
            docs = raw.decode("utf-8").split(DOC_SEPARATOR)
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"calibration data {path}: not UTF-8 text (byte {e.start})") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationDataError(f"calibration data {path}: no text in it")
    return CalibrationText(docs, name, hashlib.sha256(raw).hexdigest())


def token_stream(text: CalibrationText, tokenizer) -> list[int]:
    """Documents tokenized and joined by one ``<|endoftext|>`` (the tokenizer's first eos if absent)."""
    sep = tokenizer.special_tokens.get(EOT_TOKEN, tokenizer.eos_token_ids[0])
    stream: list[int] = []
    for i, doc in enumerate(text.documents):
        if i:
            stream.append(sep)
        stream.extend(tokenizer.encode(doc))
    return stream


def sample_windows(stream: list[int] | torch.Tensor, samples: int, seq_len: int, *, seed: int,
                   source: str = "calibration data", allow_overlap: bool = True) -> tuple[torch.Tensor, bool]:
    """Cut ``samples`` windows of ``seq_len`` tokens from ``stream`` by the module's rule.

    Returns:
        ``(tokens (samples, seq_len) int64, overlap)``; overlap says whether windows share tokens.
    Raises:
        CalibrationDataError: bad counts, or too few tokens (naming ``source``, needed vs found).
    """
    if samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"--calib-samples {samples} / --calib-seq-len {seq_len}: need at least "
                                   f"1 sample of at least 2 tokens")
    ids = torch.as_tensor(stream, dtype=torch.long)
    T, need = ids.numel(), samples * seq_len
    if T < (seq_len if allow_overlap else need):
        raise CalibrationDataError(
            f"{source}: {T} tokens, need at least {seq_len if allow_overlap else need} "
            f"({samples} x {seq_len} = {need} for disjoint windows); give more text or smaller "
            f"--calib-samples/--calib-seq-len")
    g = torch.Generator().manual_seed(seed)
    overlap = T < need
    if overlap:
        log.warning("%s has %d tokens < %d x %d: the %d windows overlap; for distinct windows pass more text "
                    "(--calib-data) or at most --calib-samples %d at --calib-seq-len %d", source, T, samples, seq_len,
                    samples, T // seq_len, seq_len)
        starts = torch.randint(0, T - seq_len + 1, (samples,), generator=g).sort().values
    else:
        slots = T // seq_len
        shift = int(torch.randint(0, T - slots * seq_len + 1, (1,), generator=g))
        starts = shift + torch.randperm(slots, generator=g)[:samples].sort().values * seq_len
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])  # (N, L)
    return windows, overlap


def calibration_tokens(spec: str | Path | None, tokenizer, *, samples: int, seq_len: int, seed: int,
                       text_field: str = "text", vocab_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """Read, tokenize and sample calibration data.

    Returns:
        ``(tokens (samples, seq_len) int64, info)`` where info (JSON-ready, no timings) names the
        data, its sha256, documents, tokens available, samples, seq_len, seed and overlap.
    Raises:
        CalibrationDataError: see :func:`load_text` and :func:`sample_windows`; token ids outside
            the model's vocabulary (a tokenizer that does not belong to the model).
    """
    text = load_text(spec, text_field=text_field)
    stream = token_stream(text, tokenizer)
    tokens, overlap = sample_windows(stream, samples, seq_len, seed=seed, source=text.name)
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise CalibrationDataError(f"{text.name}: token id {int(tokens.max())} >= the model's vocab_size "
                                   f"{vocab_size}: the tokenizer does not match the model")
    info = {"data": text.name, "data_sha256": text.sha256, "documents": len(text.documents),
            "tokens_available": len(stream), "samples": samples, "seq_len": seq_len, "seed": seed,
            "overlap": overlap}
    if str(spec or "").endswith(".jsonl"):
        info["text_field"] = text_field
    return tokens, info
