"""Rebuild the small checkpoint shipped inside the package (dbrxq/assets/tiny), by one command.

The weights are a trained model of the DBRX architecture (16 experts, top-4, GQA, clip_qkv 8)
at toy width: scripts/make_corpus.py builds a prose corpus from CPython's own standard library
(PSF License) and scripts/train_tiny.py trains on it with its default settings (seed 0, one CPU
thread, ~20 minutes) and writes config.json + model.safetensors (bf16) into the asset folder.
The tokenizer files there (scripts/make_vocab.py) are read, never rewritten.

    python scripts/make_default_model.py [--threads N] [any other train_tiny.py flag]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny  # noqa: E402

ASSET = Path(__file__).resolve().parent.parent / "dbrxq" / "assets" / "tiny"


def main() -> None:
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train_tiny.train(train_tiny.parse_args(["--out", str(ASSET), *sys.argv[1:]]))
    print(f"wrote {ASSET}")


if __name__ == "__main__":
    main()
