"""Checkpoint I/O: the streaming safetensors writer, the validating lazy reader, the hub layout
(checked against transformers' own save_pretrained) and hub repo ids (against a fake cache)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dbrxq.core.errors import CheckpointError
from dbrxq.formats.checkpoint import (
    CheckpointReader,
    hub_tensor_shapes,
    read_config,
    read_safetensors_header,
)
from dbrxq.formats.hub import resolve_model_dir
from dbrxq.formats.shards import (
    SafetensorsStreamWriter,
    ShardedCheckpointWriter,
    plan_shards,
    save_file_atomic,
)
from dbrxq.model.config import DbrxConfig


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(3, 4, 2, generator=g),
        "c.i8": torch.randint(-128, 127, (9, 3), generator=g, dtype=torch.int8),
        "d.u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "e.f16": torch.randn(2, 3, generator=g).half(),
        "f.i64": torch.arange(6, dtype=torch.int64).reshape(3, 2),
        "g.scalar": torch.tensor(3.5),
        "h.empty": torch.empty(0, 4),
    }


def _write_chunked(path, tensors, *, rows=2, metadata=None):
    specs = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    with SafetensorsStreamWriter(path, specs, metadata=metadata) as w:
        for n, t in tensors.items():
            if t.dim() == 0:
                w.write(n, t)
            else:
                for r in range(0, t.shape[0], rows):
                    w.write(n, t[r:r + rows])
    return path


def _no_temp_files(folder) -> bool:
    return not [p for p in folder.iterdir() if ".tmp." in p.name]


# -- writer --------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 2, 100])
def test_stream_writer_matches_save_file(tmp_path, rows):
    tensors = _tensors()
    ours = _write_chunked(tmp_path / "ours.safetensors", tensors, rows=rows, metadata={"format": "pt"})
    save_file(tensors, tmp_path / "ref.safetensors")
    ref = load_file(tmp_path / "ref.safetensors")
    got = load_file(ours)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == ref[name].dtype and torch.equal(got[name], ref[name]), name
    with safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_slice("c.i8")[2:5], tensors["c.i8"][2:5])
    assert int.from_bytes(ours.read_bytes()[:8], "little") % 8 == 0  # header padded: data 8-byte aligned
    assert _no_temp_files(tmp_path)


def test_save_file_atomic_roundtrip(tmp_path):
    tensors = _tensors()
    path = save_file_atomic(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    got = load_file(path)
    assert all(torch.equal(got[n], t) for n, t in tensors.items())


def test_incomplete_write_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    w = SafetensorsStreamWriter(path, [("a", (4, 2), torch.float32), ("b", (3,), torch.float32)])
    w.write("a", torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match=r"x.safetensors: incomplete write, tensor a got 16 of 32 bytes"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_exception_inside_writer_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsStreamWriter(path, [("a", (4,), torch.float32)]) as w:
            w.write("a", torch.zeros(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_misuse(tmp_path):
    with SafetensorsStreamWriter(tmp_path / "x.safetensors", [("a", (2, 2), torch.float32),
                                                              ("b", (2,), torch.float32)]) as w:
        with pytest.raises(ValueError, match="while a is due"):
            w.write("b", torch.zeros(2))
        with pytest.raises(ValueError, match="dtype"):
            w.write("a", torch.zeros(2, 2, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="shape"):
            w.write("a", torch.zeros(1, 3))
        with pytest.raises(ValueError, match="gets 32 bytes, declared 16"):
            w.write("a", torch.zeros(4, 2))
        w.write("a", torch.zeros(2, 2))
        w.write("b", torch.ones(2))
    assert torch.equal(load_file(tmp_path / "x.safetensors")["b"], torch.ones(2))


def test_plan_shards():
    f = torch.float32
    specs = [("a", (250,), f), ("b", (250,), f), ("c", (250,), f), ("big", (2000,), f), ("d", (10,), f)]
    shards = plan_shards(specs, max_shard_bytes=2000)
    assert [[s[0] for s in shard] for shard in shards] == [["a", "b"], ["c"], ["big"], ["d"]]


def test_sharded_writer_and_reader(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 5) for i in range(5)}  # 200 bytes each
    specs = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    with ShardedCheckpointWriter(tmp_path, specs, max_shard_bytes=450) as w:
        for n, t in tensors.items():
            w.write(n, t[:3])
            w.write(n, t[3:])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 1000
    assert index["weight_map"] == {"t0": "model-00001-of-00003.safetensors", "t1": "model-00001-of-00003.safetensors",
                                   "t2": "model-00002-of-00003.safetensors", "t3": "model-00002-of-00003.safetensors",
                                   "t4": "model-00003-of-00003.safetensors"}
    with CheckpointReader(tmp_path) as r:
        assert r.keys() == list(tensors)
        for n, t in tensors.items():
            assert torch.equal(r.get(n), t)
        assert r.file_of("t4").name == "model-00003-of-00003.safetensors"
        r.get("t0")
        assert len(r._handles) == 3  # one handle per shard, reused
    assert _no_temp_files(tmp_path)


def test_sharded_writer_single_shard_and_abort(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{}")  # stale, from an earlier sharded write
    with ShardedCheckpointWriter(tmp_path, [("a", (3,), torch.float32)]) as w:
        w.write("a", torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]

    out = tmp_path / "aborted"
    with pytest.raises(CheckpointError, match="incomplete write, tensor c"):
        with ShardedCheckpointWriter(out, [("a", (3,), torch.float32), ("b", (3,), torch.float32),
                                           ("c", (3,), torch.float32)], max_shard_bytes=12) as w:
            w.write("a", torch.ones(3))
            w.write("b", torch.ones(3))
    assert list(out.iterdir()) == []  # finished shards of a failed write are removed too


# -- reader -------------------------------------------------------------------------------
@pytest.fixture
def single(tmp_path):
    folder = tmp_path / "single"
    folder.mkdir()
    save_file({"w": torch.arange(32, dtype=torch.float32).reshape(8, 4).to(torch.bfloat16),
               "n": torch.ones(4)}, folder / "model.safetensors")
    return folder


@pytest.fixture
def sharded(tmp_path):
    folder = tmp_path / "sharded"
    tensors = {"a": torch.randn(4, 8), "b": torch.randn(8), "c": torch.randn(6, 2)}
    with ShardedCheckpointWriter(folder, [(n, t.shape, t.dtype) for n, t in tensors.items()],
                                 max_shard_bytes=64) as w:
        for n, t in tensors.items():
            w.write(n, t)
    return folder


def test_reader_single_file(single):
    with CheckpointReader(single) as r:
        assert set(r.keys()) == {"w", "n"} and "w" in r and "x" not in r
        assert r.shape("w") == (8, 4) and r.dtype("w") == torch.bfloat16
        assert r.file_of("w") == single / "model.safetensors"
        w = r.get("w", dtype=torch.float32, expected_shape=(8, 4))
        assert w.dtype == torch.float32 and torch.equal(w, torch.arange(32.0).reshape(8, 4))
        assert torch.equal(r.get_slice("w")[2:4].float(), torch.arange(8.0, 16.0).reshape(2, 4))


def test_reader_single_file_any_name(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "weights.safetensors")
    assert CheckpointReader(tmp_path).keys() == ["x"]


def _chop(path, n):
    data = path.read_bytes()
    path.write_bytes(data[:-n])
    return len(data)


def test_reader_missing_tensor(sharded):
    with pytest.raises(CheckpointError, match=r"sharded: tensor nope not found in the checkpoint"):
        CheckpointReader(sharded).get("nope")


def test_reader_unexpected_shape(sharded):
    with pytest.raises(CheckpointError, match=r"model-00001-of-00003.safetensors: tensor a has shape \[4, 8\], "
                                              r"expected \[8, 4\]"):
        CheckpointReader(sharded).get("a", expected_shape=(8, 4))


def test_reader_truncated_shard(sharded):
    shard = sharded / "model-00002-of-00003.safetensors"
    size = _chop(shard, 5)
    with pytest.raises(CheckpointError, match=rf"model-00002-of-00003.safetensors is truncated: expected {size} "
                                              rf"bytes, found {size - 5}"):
        CheckpointReader(sharded)


def test_reader_truncated_inside_header(single):
    _chop(single / "model.safetensors", 130)  # the tiny file's data is ~70 bytes: this cuts the header
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a safetensors file"):
        CheckpointReader(single)


@pytest.mark.parametrize("garbage", [b"", b"hello", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
                                     b"<html>" * 100])
def test_reader_non_safetensors_shard(sharded, garbage):
    (sharded / "model-00003-of-00003.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003.safetensors is not a safetensors file"):
        CheckpointReader(sharded)


def test_reader_index_names_missing_file(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json names model-00002-of-00003.safetensors, "
                                              r"which does not exist"):
        CheckpointReader(sharded)


def test_reader_invalid_index_json(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {')
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not valid JSON"):
        CheckpointReader(sharded)
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json has no 'weight_map'"):
        CheckpointReader(sharded)


def test_reader_index_maps_tensor_to_wrong_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["a"] = "model-00003-of-00003.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003.safetensors: tensor a is not in this shard"):
        CheckpointReader(sharded)


def test_reader_no_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no safetensors checkpoint found"):
        CheckpointReader(tmp_path)


def test_reader_shards_without_index(sharded):
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"but no model.safetensors.index.json"):
        CheckpointReader(sharded)
    for name in ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        (sharded / name).unlink()
    with pytest.raises(CheckpointError, match=r"but no model.safetensors.index.json"):  # one shard of three
        CheckpointReader(sharded)


def test_read_config(tmp_path):
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: no config.json"):
        read_config(tmp_path)
    DbrxConfig(d_model=64, n_heads=4, n_layers=1).save(tmp_path / "config.json")
    assert read_config(tmp_path).d_model == 64


def test_header_only_validation_reads_no_data(single):
    header = read_safetensors_header(single / "model.safetensors")
    assert header["w"]["shape"] == [8, 4] and "__metadata__" not in header


# -- the hub layout, against transformers' own writer --------------------------------------
def _tiny_hf_config():
    from transformers import DbrxConfig as HFDbrxConfig
    return HFDbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128,
                        attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 500000.0},
                        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2})


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_reads_transformers_checkpoint(tmp_path, max_shard_size):
    from transformers import DbrxForCausalLM
    torch.manual_seed(0)
    model = DbrxForCausalLM(_tiny_hf_config())
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_size is not None)
    config = read_config(tmp_path)
    expected = hub_tensor_shapes(config)
    with CheckpointReader(tmp_path) as r:
        assert sorted(r.keys()) == sorted(expected)
        assert {n: r.shape(n) for n in r.keys()} == expected
        state = model.state_dict()
        for name in expected:
            assert torch.equal(r.get(name), state[name]), name


def test_hub_tensor_shapes_order_and_dbrx_sizes():
    config = DbrxConfig.from_dict({"d_model": 6144, "n_heads": 48, "n_layers": 40, "vocab_size": 100352,
                                   "attn_config": {"kv_n_heads": 8},
                                   "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4}})
    shapes = hub_tensor_shapes(config)
    names = list(shapes)
    assert names[0] == "transformer.wte.weight" and names[-2:] == ["transformer.norm_f.weight", "lm_head.weight"]
    assert shapes["transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight"] == (8192, 6144)
    assert shapes["transformer.blocks.39.ffn.experts.mlp.w1"] == (16 * 10752, 6144)
    # The real checkpoint: 263,193,047,040 bytes of bf16 (docs/architecture.md).
    assert sum(2 * torch.Size(s).numel() for s in shapes.values()) == 263_193_047_040


# -- hub repo ids, against a fake cache (never the network) ----------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A huggingface_hub cache holding org/name at COMMIT, in offline mode."""
    import huggingface_hub.constants as hf_constants
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--org--name"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    DbrxConfig(d_model=64, n_heads=4, n_layers=1).save(snapshot / "config.json")
    save_file({"x": torch.ones(2)}, snapshot / "model.safetensors")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_resolve_local_folder(tmp_path):
    assert resolve_model_dir(tmp_path) == tmp_path
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_resolve_cached_repo_offline(offline_hub):
    folder = resolve_model_dir("org/name")
    assert folder.resolve() == offline_hub.resolve()
    assert CheckpointReader(folder).keys() == ["x"]


def test_resolve_uncached_repo_offline(offline_hub):
    with pytest.raises(CheckpointError, match=r"hub repo org/other is not \(completely\) in the local cache.*offline"):
        resolve_model_dir("org/other")


@pytest.mark.parametrize("text", ["no-such-folder", "a/b/c", "./missing/dir", "org/"])
def test_resolve_neither_folder_nor_repo_id(tmp_path, text, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="is not a folder and not a hub repo id"):
        resolve_model_dir(text)


def test_resolve_file_is_not_a_folder(single):
    with pytest.raises(CheckpointError, match="is not a folder and not a hub repo id"):
        resolve_model_dir(single / "model.safetensors")


def test_load_whole_model_from_cached_hub_repo(offline_hub):
    """dbrxq.load with a repo id: the embedded model placed in a fake hub cache, offline."""
    import dbrxq
    for f in offline_hub.iterdir():
        f.unlink()
    for f in dbrxq.default_model_dir().iterdir():
        (offline_hub / f.name).write_bytes(f.read_bytes())
    from_hub = dbrxq.load("org/name")
    local = dbrxq.load()
    assert from_hub.generate("x = ", max_new_tokens=8) == local.generate("x = ", max_new_tokens=8)


def test_typo_path_shaped_like_a_repo_id_says_no_local_folder(offline_hub, tmp_path, monkeypatch):
    """A mistyped relative path like "modls/dbrx" is tried as a hub repo id; the error says that no
    such local folder exists as well, and names HF_HUB_OFFLINE only when it is set."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        resolve_model_dir("modls/dbrx")
    msg = str(e.value)
    assert "no local folder modls/dbrx" in msg and "HF_HUB_OFFLINE is set" in msg and "\n" not in msg

    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    def unreachable(*a, **k):
        raise hf_errors.LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(CheckpointError) as e:
        resolve_model_dir("modls/dbrx")
    msg = str(e.value)
    assert "no local folder modls/dbrx" in msg and "cannot be reached" in msg and "HF_HUB_OFFLINE" not in msg
