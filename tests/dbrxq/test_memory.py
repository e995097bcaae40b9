"""What the process may use (dbrxq.core.memory), --cpu-memory auto, and a run inside a real memory cgroup."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import dbrxq
from dbrxq.core import memory
from dbrxq.core.errors import BudgetError

GiB = 1 << 30


def fake_proc(tmp_path: Path, cgroup_lines: list[str], available_kib: int = 8 * 2**20, rss_kib: int = 100 * 1024) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("\n".join(cgroup_lines) + "\n")
    (proc / "self" / "status").write_text(f"Name:\tpython\nVmHWM:\t{rss_kib} kB\nVmRSS:\t{rss_kib} kB\n")
    (proc / "meminfo").write_text(f"MemTotal:       {4 * available_kib} kB\nMemAvailable:   {available_kib} kB\n")
    return proc


def limit(path: Path, value: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / ("memory.max" if "unified" in str(path) or "v2" in str(path) else "memory.limit_in_bytes")).write_text(value)


def test_cgroup_v1_limit_up_the_hierarchy(tmp_path):
    """v1: the smallest limit among the process's memory cgroup and its ancestors (a parent's limit binds
    its children); v1's 'no limit' (a huge number) is no limit."""
    proc = fake_proc(tmp_path, ["4:memory:/jobs/run1", "3:cpuset:/"])
    root = tmp_path / "cg"
    limit(root / "memory", "9223372036854771712")
    limit(root / "memory" / "jobs", str(3 * GiB))
    limit(root / "memory" / "jobs" / "run1", str(5 * GiB))
    got = memory.cgroup_limit(cgroup_root=root, proc=proc)
    assert got[0] == 3 * GiB and got[1].endswith("jobs/memory.limit_in_bytes")
    assert memory.memory_limit(cgroup_root=root, proc=proc)[0] == 3 * GiB  # below MemAvailable + RSS (8.1 GiB)


def test_cgroup_v2_and_memavailable(tmp_path):
    """v2: memory.max ('max' is no limit); without any limit, MemAvailable plus what the process holds."""
    proc = fake_proc(tmp_path, ["0::/user.slice/app.scope"])
    root = tmp_path / "v2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("memory cpu\n")
    limit(root / "user.slice", "max")
    limit(root / "user.slice" / "app.scope", str(2 * GiB))
    assert memory.cgroup_limit(cgroup_root=root, proc=proc) == (2 * GiB, str(root / "user.slice/app.scope/memory.max"))
    (root / "user.slice" / "app.scope" / "memory.max").write_text("max\n")
    assert memory.cgroup_limit(cgroup_root=root, proc=proc) is None
    got, where = memory.memory_limit(cgroup_root=root, proc=proc)
    assert got == (8 * 2**20 + 100 * 1024) * 1024 and "MemAvailable" in where
    budget, line = memory.auto_budget(cgroup_root=root, proc=proc)
    assert budget == got - max(memory.AUTO_MARGIN_MIN, int(got * memory.AUTO_MARGIN_FRACTION))
    assert "--cpu-memory auto" in line and "margin" in line


def test_a_budget_below_the_process_itself_is_refused(tmp_path):
    """The budget is the process: one smaller than what the process holds before any weight is refused
    in one line that says so."""
    folder = _tiny_quantized(tmp_path)
    with pytest.raises(BudgetError, match="the process itself holds"):
        dbrxq.load(folder, cpu_memory="100MiB", context=32)


def _tiny_quantized(tmp_path: Path) -> Path:
    from quantize.config import QuantConfig
    from quantize.writer import quantize_checkpoint
    return quantize_checkpoint(dbrxq.default_model_dir(), tmp_path / "q", QuantConfig(), progress=False)


def test_a_model_that_does_not_fit_offloads_with_auto(tmp_path, monkeypatch, caplog):
    """No budget given and a model larger than what the process may use: the load offloads its
    experts with --cpu-memory auto and says what it chose."""
    import logging

    import dbrxq.loading.loader as loader
    import dbrxq.plan.checkpoint as planning
    import torch

    from dbrxq.formats.checkpoint import CheckpointReader, checkpoint_float_dtype
    from dbrxq.model.config import DbrxConfig
    folder = _tiny_quantized(tmp_path)
    with CheckpointReader(folder) as r:  # what a budget of 4 expert slots per layer is (test process: constant)
        plan, layout = planning.plan_offload(r, DbrxConfig.from_json(folder / "config.json"), device=torch.device("cpu"),
                                             dtype=checkpoint_float_dtype(r), backend=None, gpu_memory=None,
                                             cpu_memory="1GiB", context=32, batch_size=1, kv_cache="bf16")
    four = plan.process_bytes + plan.device_fixed_bytes + 4 * plan.n_layers * layout.nbytes
    monkeypatch.setattr(loader, "memory_limit", lambda: (1 << 20, "memory cgroup limit (test)"))
    monkeypatch.setattr(planning, "auto_budget", lambda: (four, "--cpu-memory auto: (test)"))
    with caplog.at_level(logging.WARNING):
        runner = dbrxq.load(folder, context=32, offload_options={"cache_dir": tmp_path})
    assert runner.offload is not None and runner.offload.plan.slots_per_layer == [4] * 4
    assert any("do not fit" in m for m in caplog.messages) and any("--cpu-memory auto" in m for m in caplog.messages)


def test_without_proc_auto_is_refused_in_one_line_and_a_plain_load_still_works(tmp_path, monkeypatch):
    """Not Linux (no /proc, no cgroups): --cpu-memory auto cannot be decided and says so; a load that
    names no budget loads the model whole; the process's RSS falls back to its peak (not zero)."""
    import dbrxq.loading.loader as loader
    import dbrxq.plan.checkpoint as planning

    assert memory.process_rss(proc=tmp_path / "none") > 10 << 20
    with pytest.raises(OSError):
        memory.memory_limit(cgroup_root=tmp_path / "none", proc=tmp_path / "none")

    def nothing():
        raise OSError("neither a memory cgroup limit nor /proc/meminfo could be read")
    monkeypatch.setattr(loader, "memory_limit", nothing)
    monkeypatch.setattr(planning, "auto_budget", nothing)
    folder = _tiny_quantized(tmp_path)
    with pytest.raises(BudgetError, match=r"--cpu-memory auto: cannot tell how much memory there is .*--cpu-memory 20GiB"):
        dbrxq.load(folder, cpu_memory="auto", context=32)
    assert dbrxq.load(folder, context=32).offload is None


def _cgroup_v1() -> Path | None:
    base = Path("/sys/fs/cgroup/memory")
    if os.geteuid() != 0 or not (base / "cgroup.procs").exists():
        return None
    return base


@pytest.mark.skipif(_cgroup_v1() is None, reason="needs root and a cgroup v1 memory controller")
def test_auto_inside_a_memory_cgroup_is_not_killed(tmp_path):
    """A real cgroup (v1) limited below what the model and the process need whole: `dbrxq run
    --cpu-memory auto` reads the limit, offloads, and finishes (exit 0, and the cgroup counted no OOM
    kill)."""
    from dbrxq.formats.random import preset_config
    from quantize.config import QuantConfig
    from quantize.random import make_random_quantized_checkpoint
    config = preset_config("dbrx", n_layers=1, vocab_size=1536, moe_num_experts=8, moe_top_k=2, max_seq_len=64)
    folder = make_random_quantized_checkpoint(tmp_path / "q", config, QuantConfig(), progress=False)
    for f in dbrxq.default_model_dir().glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    cg = _cgroup_v1() / f"dbrxq-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        size = 1100 << 20  # the model is 0.88 GiB of experts; the process ~0.3 GiB more
        (cg / "memory.limit_in_bytes").write_text(str(size))
        if (cg / "memory.memsw.limit_in_bytes").exists():
            (cg / "memory.memsw.limit_in_bytes").write_text(str(size))
        script = (f"echo $$ > {cg}/cgroup.procs && exec {sys.executable} -m dbrxq.cli run {folder} "
                  f"-p 'The function returns' -n 4 --context 32 --cpu-memory auto --threads 1 "
                  f"--cache-dir {tmp_path / 'cache'}")
        r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "--cpu-memory auto" in r.stderr and "memory cgroup limit" in r.stderr
        oom = dict(line.split() for line in (cg / "memory.oom_control").read_text().splitlines())
        assert oom.get("oom_kill", "0") == "0", oom
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                import time
                time.sleep(0.1)
