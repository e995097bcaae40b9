"""Build a small DBRX-style tokenizer vocabulary for tiny checkpoints.

Writes ``tokenizer.tiktoken`` + ``tokenizer.tiktoken.json`` (format in
dbrxq/text/tokenizer.py) into --out: SIZE BPE ranks, then DBRX's 8 special-token names at
ids SIZE..SIZE+7. Deterministic: the same input gives byte-identical files.

  # cl100k_base cut to its SIZE lowest ranks (the ideal small DBRX vocabulary)
  python scripts/make_vocab.py --from-cl100k cl100k_base.tiktoken --size 2048 --out DIR
  # trained on a text file, or on this Python's pydoc topics (what dbrxq/assets/tiny uses)
  python scripts/make_vocab.py --from-text book.txt --size 1528 --out DIR
  python scripts/make_vocab.py --from-pydoc --size 1528 --out dbrxq/assets/tiny
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from dbrxq.text.tokenizer import DbrxTokenizer, read_tiktoken_file
from dbrxq.text.vocab import restrict_ranks, train_bpe, write_vocab


def pydoc_text() -> tuple[str, str]:
    """The running Python's pydoc help topics (excerpts of the Language Reference), in
    sorted topic order, and a provenance line naming version and license."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    version = ".".join(map(str, sys.version_info[:3]))
    provenance = (
        f"BPE trained on CPython {version} Lib/pydoc_data/topics.py (pydoc help topics: excerpts "
        f"of the Python Language Reference, {len(text)} characters, topics in sorted order); "
        "Python documentation (c) Python Software Foundation, PSF License Version 2"
    )
    return text, provenance


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-cl100k", type=Path, metavar="PATH", help="a cl100k_base.tiktoken file")
    src.add_argument("--from-text", type=Path, metavar="PATH", help="a UTF-8 text file to train on")
    src.add_argument("--from-pydoc", action="store_true", help="train on this Python's pydoc topics")
    p.add_argument("--size", type=int, required=True, help="number of BPE ranks (>= 256), specials excluded")
    p.add_argument("--out", type=Path, required=True, help="folder to write the vocabulary into")
    p.add_argument("--provenance", default=None, help="provenance line for the sidecar (default: derived)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.size < 256:
        p.error("--size must be at least 256 (one rank per byte)")

    t0 = time.perf_counter()
    if args.from_cl100k:
        ranks = restrict_ranks(read_tiktoken_file(args.from_cl100k), args.size)
        provenance = f"tiktoken cl100k_base restricted to its {args.size} lowest ranks"
    else:
        if args.from_text:
            text = args.from_text.read_text(encoding="utf-8")
            provenance = f"BPE trained on {args.from_text.name} ({len(text)} characters)"
        else:
            text, provenance = pydoc_text()
        ranks = train_bpe(text, args.size)
    write_vocab(args.out, ranks, provenance=args.provenance or provenance)

    tok = DbrxTokenizer.from_pretrained(args.out)  # proves the files load
    sample = "The quick brown fox jumps over the lazy dog."
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s: {len(ranks)} ranks + "
          f"{len(tok.special_tokens)} special tokens, vocab_size {tok.vocab_size}, "
          f"eos {tok.eos_token_ids}, pad {tok.pad_token_id}")
    print(f"{sample!r} -> {len(tok.encode(sample))} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
