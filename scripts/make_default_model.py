"""Write the small checkpoint shipped inside the package (dbrxq/assets/tiny).

For now it holds random weights of the DBRX architecture (16 experts, top-4) at toy width, with
the small BPE vocabulary that scripts/make_vocab.py wrote into the same folder. A trained model
replaces the weights later (scripts/train_tiny.py); the folder layout stays the same.

    python scripts/make_default_model.py
"""

import argparse
from pathlib import Path

import torch

from dbrxq.make_checkpoint import make_random_checkpoint
from dbrxq.config import DbrxConfig
from dbrxq.tokenizer import DbrxTokenizer

ASSET = Path(__file__).resolve().parent.parent / "dbrxq" / "assets" / "tiny"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ASSET)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tok = DbrxTokenizer.from_pretrained(ASSET)
    config = DbrxConfig.from_dict({
        "d_model": 128, "n_heads": 4, "n_layers": 2, "max_seq_len": 1024, "vocab_size": tok.vocab_size,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8, "rope_theta": 500000},
        "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 16, "moe_top_k": 4, "moe_loss_weight": 0.05},
        "eos_token_id": tok.eos_token_ids, "pad_token_id": tok.pad_token_id,
    })
    make_random_checkpoint(args.out, config, seed=args.seed, dtype=torch.bfloat16, progress=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
