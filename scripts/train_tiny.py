"""Train the small DBRX-architecture demo model shipped in dbrxq/assets/tiny.

The architecture is DBRX's exactly (16 GLU experts with top-4 routing, GQA, clip_qkv 8, RoPE
theta 5e5, bias-free LayerNorms) at toy width, built with our own dbrxq.DbrxForCausalLM and
trained with its own loss: next-token cross-entropy + moe_loss_weight * the load-balancing aux
loss (output_router_logits=True). AdamW, linear warmup then cosine decay, gradient clipping.

Data: the CPython-standard-library prose corpus of scripts/make_corpus.py (PSF License), built
into ~/.cache/dbrxq/corpus when missing, tokenized with the embedded tokenizer; documents are
joined with <|endoftext|> and training windows are drawn at seeded random offsets. The held-out
loss is measured on calibration/data/heldout.txt (held-out documents only) with
dbrxq.runtime.evaluate.perplexity.

Runs on CUDA when present (bf16 autocast), else on CPU in float32 with --threads threads; the
defaults take ~20 minutes on one CPU thread. Seeded: the same flags on the same machine give the
same weights. Output: config.json + model.safetensors (bf16, the hub's names) + tokenizer files.

    python scripts/train_tiny.py --out /tmp/tiny        # then: dbrxq run /tmp/tiny -p "The for statement"
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import make_corpus  # noqa: E402

from dbrxq.core.files import write_json_atomic  # noqa: E402
from dbrxq.formats.shards import save_file_atomic
from dbrxq.model.config import DbrxConfig  # noqa: E402
from dbrxq import DbrxForCausalLM  # noqa: E402
from dbrxq.runtime.evaluate import perplexity  # noqa: E402
from dbrxq.text.tokenizer import DbrxTokenizer  # noqa: E402

log = logging.getLogger("train_tiny")
TOKENIZER_DIR = REPO / "dbrxq" / "assets" / "tiny"


def model_config(tok: DbrxTokenizer, args: argparse.Namespace) -> DbrxConfig:
    return DbrxConfig.from_dict({
        "d_model": args.d_model, "n_heads": args.n_heads, "n_layers": args.n_layers, "max_seq_len": 1024,
        "vocab_size": tok.vocab_size,
        "attn_config": {"kv_n_heads": args.kv_heads, "clip_qkv": 8, "rope_theta": 500000},
        "ffn_config": {"ffn_hidden_size": args.ffn, "moe_num_experts": 16, "moe_top_k": 4,
                       "moe_loss_weight": 0.05, "moe_normalize_expert_weights": 1.0},
        "eos_token_id": tok.eos_token_ids, "pad_token_id": tok.pad_token_id,
    })


def load_stream(tok: DbrxTokenizer, corpus: Path) -> torch.Tensor:
    """All training documents as one (N,) int64 stream, <|endoftext|> after each."""
    if not (corpus / "train.jsonl").is_file():
        log.info("building the corpus in %s", corpus)
        make_corpus.build(corpus)
    eot = tok.special_tokens["<|endoftext|>"]
    ids: list[int] = []
    for text in make_corpus.read_jsonl(corpus / "train.jsonl"):
        ids += tok.encode(text) + [eot]
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to args.lr, then cosine decay to args.lr / 10."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights, embeddings, experts); not the LayerNorm gains."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save(model: DbrxForCausalLM, out: Path, meta: dict) -> None:
    """config.json + bf16 model.safetensors (hub names) + the tokenizer, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file_atomic(tensors, out / "model.safetensors",
                     metadata={"format": "pt", "dbrxq_training": json.dumps(meta, sort_keys=True)})
    if out.resolve() != TOKENIZER_DIR.resolve():
        # The vocabulary and its JSON sidecar (dbrxq.formats.hub.TOKENIZER_PATTERNS lacks the latter).
        for p in sorted(TOKENIZER_DIR.glob("tokenizer.tiktoken*")):
            shutil.copy2(p, out / p.name)
    d = model.config.to_dict()
    d["torch_dtype"] = "bfloat16"
    write_json_atomic(d, out / "config.json")  # last: a folder with a config.json is complete


def train(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    tok = DbrxTokenizer.from_pretrained(TOKENIZER_DIR)
    config = model_config(tok, args)
    stream = load_stream(tok, args.corpus)
    heldout = torch.tensor(tok.encode((make_corpus.DATA_DIR / "heldout.txt").read_text()))
    log.info("corpus: %d training tokens; held-out sample: %d tokens", stream.numel(), heldout.numel())

    gen = torch.Generator().manual_seed(args.seed)
    model = DbrxForCausalLM(config).init_weights(gen).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d params (%.2f MB in bf16) on %s", n_params, 2 * n_params / 1e6, device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def evaluate(n_tokens: int | None) -> dict:
        model.eval()
        ids = heldout if n_tokens is None else heldout[:n_tokens]
        with autocast:
            r = perplexity(model, ids, window=args.seq_len, stride=args.seq_len // 2)
        model.train()
        return r

    T, B = args.seq_len, args.batch
    t0, seen, history = time.time(), 0, []
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        starts = torch.randint(0, stream.numel() - T, (B,), generator=gen)
        x = torch.stack([stream[s:s + T] for s in starts]).to(device)  # (B, T)
        with autocast:
            out = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += B * (T - 1)
        if step % args.log_every == 0 or step == args.steps - 1:
            ce = out.loss.item() - config.ffn_config.moe_loss_weight * out.aux_loss.item()
            log.info("step %5d/%d  lr %.2e  train ce %.3f  aux %.3f  %.0f tok/s  %.0fs", step, args.steps,
                     lr_at(step, args), ce, out.aux_loss.item(), seen / (time.time() - t0), time.time() - t0)
        if args.eval_every and step and step % args.eval_every == 0:
            r = evaluate(args.eval_tokens)
            history.append({"step": step, "heldout_nll": round(r["nll"], 4)})
            log.info("step %5d  held-out (first %d tokens) loss %.3f  ppl %.2f", step, r["tokens"] + 1,
                     r["nll"], r["ppl"])
    train_s = time.time() - t0
    final = evaluate(None)
    log.info("done: %d steps, %d tokens in %.0fs; held-out loss %.4f ppl %.2f (%d tokens, window %d stride %d)",
             args.steps, seen, train_s, final["nll"], final["ppl"], final["tokens"], T, T // 2)
    meta = {"script": "scripts/train_tiny.py", "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
            "train_tokens_seen": seen, "corpus_tokens": stream.numel(), "train_seconds": round(train_s),
            "device": device.type, "heldout_nll": round(final["nll"], 4), "heldout_ppl": round(final["ppl"], 3),
            "history": history, "corpus_license": make_corpus.LICENSE}
    save(model.float(), args.out, meta)
    log.info("wrote %s", args.out)
    return args.out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    ap.add_argument("--corpus", type=Path, default=make_corpus.DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the default box is shared)")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is present")
    # Shape: a few MB in bf16; 16 experts / top-4 / GQA as DBRX.
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--n-layers", type=int, default=4)
    # 128: w2 quantizes along ffn_hidden_size, and group size 128 (the default recipe) must divide it.
    ap.add_argument("--ffn", type=int, default=128, help="ffn_hidden_size of each expert")
    # Optimisation.
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for the periodic eval")
    return ap.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train(parse_args())
