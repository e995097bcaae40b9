"""Shared fixtures: tiny DBRX models built in memory (no files, no network)."""

import pytest
import torch

from dbrxq.model.config import DbrxConfig
from dbrxq import DbrxForCausalLM

TINY = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=40, vocab_size=50,
            attn_config=dict(kv_n_heads=2, clip_qkv=8, rope_theta=10000),
            ffn_config=dict(ffn_hidden_size=24, moe_num_experts=8, moe_top_k=2))


def build_tiny_model(seed: int = 0, **overrides) -> DbrxForCausalLM:
    """A seeded, randomly initialised float32 DBRX of toy width (8 experts, top-2)."""
    torch.manual_seed(seed)
    return DbrxForCausalLM(DbrxConfig.from_dict({**TINY, **overrides})).init_weights().eval()


# What a budget's plan takes for the process itself, in this (long-lived, growing) test process: a
# constant, so a budget computed for N expert slots gives N slots when a test loads with it. The whole
# accounting, with the real RSS, is tested in a fresh interpreter (test_offload.py's peak-RSS test).
TEST_PROCESS_BYTES = 256 << 20


@pytest.fixture(autouse=True)
def steady_process_bytes(monkeypatch):
    import dbrxq.plan.checkpoint as planning
    monkeypatch.setattr(planning, "process_rss", lambda: TEST_PROCESS_BYTES)


@pytest.fixture
def tiny_model():
    return build_tiny_model


@pytest.fixture
def dbrxq_main(monkeypatch, capsys):
    """Run the dbrxq command line in this process (``dbrxq.cli.app.main``, as the console script does):
    ``dbrxq_main(*args) -> (exit status, stderr)``."""
    import sys

    from dbrxq import cli

    def run(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["dbrxq", *map(str, args)])
        capsys.readouterr()
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code or 0
        return code, capsys.readouterr().err
    return run

