"""GGML types per tensor under a file-size budget: ``dbrxq export FLOAT OUT.gguf --target-size SIZE``.

A GGUF file holds each tensor in one GGML type (a layer's 16 experts share one per kind). Which tensor
deserves which type is measured, not guessed: to second order, quantizing the weights W to W + dW
raises the mean KL(float || quantized) of the next-token distributions by

    1/2 sum_ij F_ij dW_ij^2  per token,

F the diagonal of the model's Fisher information. F is estimated on the calibration tokens with the
float model: per sequence, labels drawn from the model's own next-token distributions, and the
gradient g of their log-likelihood squared (the sampled labels make the score of each position zero
in expectation, so E[g^2] is the sum over positions of the per-position Fisher). For every tensor and
every candidate type (:data:`CANDIDATES`, the K-types only on rows of whole 256-value blocks) dW is
dbrxq's round to nearest on that grid, and the prediction is accumulated over the sequences. The
token embedding and the output head are tensors like the others here: their share of the KL is
measured the same way.

The predictions of different tensors are summed (their errors taken as independent), and
:mod:`quantize.allocate` picks one type per tensor with the least summed prediction within the bytes
left for them (exactly by dynamic programming, the convex-hull greedy when that is too large).

Memory: the float model in float32, one gradient of it, and one rounding error per candidate type of
each tensor (7 x the weights): a measuring job for models of up to a few hundred million parameters,
not for DBRX's 132B on one machine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from calibration.options import CalibrationOptions
from calibration.tokens import calibration_tokens
from dbrxq.core.errors import ConfigError, QuantizationError
from dbrxq.loading.loader import load_model
from dbrxq.text.tokenizer import DbrxTokenizer
from quantize import kquants
from quantize.allocate import solve_exact, solve_greedy
from quantize.primitives import quantize_tensor

log = logging.getLogger(__name__)

CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16")
EXPERT_KINDS = (("w1", "ffn_gate_exps", False), ("v1", "ffn_up_exps", False), ("w2", "ffn_down_exps", True))


def candidates(k: int) -> tuple[str, ...]:
    """The types a row of ``k`` values can take: K-types on whole 256-blocks, Q8_0 on whole 32-blocks."""
    return tuple(t for t in CANDIDATES if (t == "F16") or (t == "Q8_0" and k % 32 == 0) or k % kquants.QK_K == 0)


@dataclass
class Matrix:
    """One GGUF tensor: its name, the model parameter holding it, and how the GGUF rows lie in it."""

    gguf: str
    param: str
    experts: int = 0  # > 0: a hub expert stack [E*F, D]
    transpose: bool = False  # per expert: GGUF rows are the hub matrix's columns (w2)

    def rows(self, w: torch.Tensor) -> torch.Tensor:
        """The parameter as GGUF rows [..., N, K] (float32)."""
        w = w.detach().float()
        if not self.experts:
            return w
        w = w.reshape(self.experts, -1, w.shape[-1])
        return w.transpose(1, 2) if self.transpose else w

    def back(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """GGUF rows back in the parameter's shape."""
        if self.transpose:
            rows = rows.transpose(1, 2)
        return rows.reshape(like.shape)


def matrices(config, names: set[str]) -> list[Matrix]:
    """The export's quantizable tensors of a DBRX model whose parameters are ``names``."""
    out = [Matrix("token_embd.weight", "transformer.wte.weight")]
    for i in range(config.n_layers):
        a = f"transformer.blocks.{i}.norm_attn_norm.attn"
        out += [Matrix(f"blk.{i}.attn_qkv.weight", f"{a}.Wqkv.weight"),
                Matrix(f"blk.{i}.attn_output.weight", f"{a}.out_proj.weight")]
        out += [Matrix(f"blk.{i}.{short}.weight", f"transformer.blocks.{i}.ffn.experts.mlp.{k}", config.num_experts, t)
                for k, short, t in EXPERT_KINDS]
    if "lm_head.weight" in names:
        out.append(Matrix("output.weight", "lm_head.weight"))
    return out


def round_to(w: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """dbrxq's round to nearest of GGUF rows ``w`` on ``ggml_type``'s grid, dequantized (float32)."""
    if ggml_type == "F16":
        return w.half().float()
    flat = w.reshape(-1, w.shape[-1])
    if ggml_type == "Q8_0":  # as the exporter writes it (quantize.ggml.float_to_type)
        return quantize_tensor(flat, 8, 32, True).dequantize().reshape(w.shape)
    return kquants.dequantize(kquants.quantize(flat, ggml_type)).reshape(w.shape)


@dataclass
class Sensitivity:
    """Per GGUF tensor: the candidate types and the predicted mean KL per token of each."""

    kl: dict[str, dict[str, float]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0


@torch.no_grad()
def _errors(model, mats: list[Matrix]) -> dict[str, dict[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    out = {}
    for m in mats:
        p = params[m.param]
        rows = m.rows(p)
        out[m.gguf] = {t: m.back(round_to(rows, t) - rows, p) for t in candidates(rows.shape[-1])}
    return out


def measure(model_dir, opts: CalibrationOptions | None = None, *, progress: bool = False) -> Sensitivity:
    """Predicted KL of every candidate type of every tensor of the float model in ``model_dir``."""
    from tqdm.auto import tqdm

    opts = opts or CalibrationOptions()
    t0 = time.perf_counter()
    model = load_model(model_dir, dtype="float32")
    config = model.config
    if opts.seq_len > config.max_seq_len:
        raise ConfigError(f"--calib-seq-len {opts.seq_len} is longer than the model's context (max_seq_len "
                          f"{config.max_seq_len})")
    tokenizer = DbrxTokenizer.from_pretrained(model_dir)
    tokens, _ = calibration_tokens(opts.data, tokenizer, samples=opts.samples, seq_len=opts.seq_len, seed=opts.seed,
                                   text_field=opts.text_field, vocab_size=config.vocab_size)
    params = dict(model.named_parameters())
    mats = matrices(config, set(params))
    errors = _errors(model, mats)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in mats:
        params[m.param].requires_grad_(True)
    acc = {m.gguf: {t: 0.0 for t in errors[m.gguf]} for m in mats}
    gen = torch.Generator().manual_seed(opts.seed)
    model.train(False)
    for ids in tqdm(tokens, desc="fisher", disable=not progress):
        logits = model(ids[None]).logits[0].float()
        labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)[:, 0]
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        model.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for m in mats:
                g = params[m.param].grad
                for t, dw in errors[m.gguf].items():
                    acc[m.gguf][t] += float((dw * g).square().sum())
    n = tokens.numel()
    out = Sensitivity(tokens=n, seconds=time.perf_counter() - t0)
    for m in mats:
        out.kl[m.gguf] = {t: 0.5 * v / n for t, v in acc[m.gguf].items()}
        out.shapes[m.gguf] = tuple(m.rows(params[m.param]).shape)
    return out


def allocate(sens: Sensitivity, budget: int, nbytes) -> tuple[dict[str, str], float, int]:
    """One type per tensor of ``sens`` with the least summed predicted KL whose bytes (``nbytes(type,
    shape)``, padding included) sum to at most ``budget``. Returns (types, predicted KL, bytes)."""
    names = list(sens.kl)
    opts = [list(sens.kl[n]) for n in names]
    costs = [[nbytes(t, sens.shapes[n]) for t in o] for n, o in zip(names, opts)]
    errs = [[sens.kl[n][t] for t in o] for n, o in zip(names, opts)]
    least = sum(min(c) for c in costs)
    if budget < least:
        raise QuantizationError(f"--target-size leaves {budget} bytes for the quantized tensors; their smallest "
                                f"types take {least}")
    try:
        a = solve_exact(costs, errs, budget)
    except QuantizationError:
        a = solve_greedy(costs, errs, budget)
    return {n: o[j] for n, o, j in zip(names, opts, a.choice)}, a.error, a.bytes
