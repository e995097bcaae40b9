"""Hostile and broken checkpoints: a corpus of cases, each run against `dbrxq.load`, `dbrxq run`,
`dbrxq eval` and `dbrxq quantize`.

Every case is built here from the shipped demo model (or its RTN-quantized copy). For each, every
entry point must fail with exit status 2 (the API: a DbrxqError) and one line naming the file or
field, never a traceback; no file outside the case's folder may be opened (an inotify watch on a
sentinel folder beside it, which the case's links and index entries point at, sees every open by
any library, Rust's safetensors included); and quantize must not leave a complete-looking OUT.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dbrxq
from dbrxq.core.errors import DbrxqError
from dbrxq.formats.hub import default_model_dir
from dbrxq.model.config import DbrxConfig
from quantize import blocks
from quantize.config import ModuleQuant, QuantConfig
from quantize.specs import expert_slot
from quantize.writer import quantize_checkpoint

DEMO = default_model_dir()
ALL = ("load", "run", "eval", "quantize")
QUANT_ENTRIES = ("load", "run", "eval")  # quantize refuses a quantized source anyway


# ----------------------------------------------------------------------------- watching opens

class OpenWatch:
    """inotify IN_OPEN on one folder: which of its files were opened (by anyone) since start."""

    IN_OPEN = 0x20

    def __init__(self, folder: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0, ctypes.get_errno()
        assert self.libc.inotify_add_watch(self.fd, str(folder).encode(), self.IN_OPEN) >= 0

    def opened(self) -> list[str]:
        names = []
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return names
        i = 0
        while i < len(data):
            _, _, _, n = struct.unpack_from("iIII", data, i)
            names.append(data[i + 16:i + 16 + n].rstrip(b"\0").decode() or ".")
            i += 16 + n
        return names

    def close(self) -> None:
        os.close(self.fd)


# ----------------------------------------------------------------------------- building cases

def tensors(case: Path) -> dict:
    return load_file(case / "model.safetensors")


def rewrite(case: Path, fn) -> None:
    t = tensors(case)
    fn(t)
    save_file(t, case / "model.safetensors")


def edit_config(case: Path, fn=None, text: str | bytes | None = None) -> None:
    p = case / "config.json"
    if text is not None:
        p.write_bytes(text.encode() if isinstance(text, str) else text)
        return
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def edit_header(path: Path, fn) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    new = fn(header)
    hb = new if isinstance(new, bytes) else json.dumps(header if new is None else new).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def index(case: Path, weight_map: dict | None = None, text: str | None = None) -> None:
    wm = {n: "model.safetensors" for n in tensors(case)} if weight_map is None else weight_map
    (case / "model.safetensors.index.json").write_text(text if text is not None else json.dumps({"weight_map": wm}))


def first_tensor(case: Path) -> str:
    return "transformer.wte.weight"


def link(case: Path, name: str, target: Path) -> None:
    p = case / name
    if p.exists() or p.is_symlink():
        p.unlink()
    p.symlink_to(target)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _split_shards(case: Path) -> None:
    """Two shards, each holding transformer.wte.weight; the index maps it to the first."""
    t = tensors(case)
    names = list(t)
    a = {n: t[n] for n in names[: len(names) // 2]}
    b = {n: t[n] for n in names[len(names) // 2:]}
    b["transformer.wte.weight"] = t["transformer.wte.weight"].clone()
    (case / "model.safetensors").unlink()
    save_file(a, case / "model-00001-of-00002.safetensors")
    save_file(b, case / "model-00002-of-00002.safetensors")
    wm = {n: "model-00001-of-00002.safetensors" for n in a} | {n: "model-00002-of-00002.safetensors" for n in b
                                                             if n != "transformer.wte.weight"}
    index(case, wm)


def _index_to(name_for_wte):
    def build(case, out):
        wm = {n: "model.safetensors" for n in tensors(case)}
        wm["transformer.wte.weight"] = name_for_wte(case, out)
        index(case, wm)
    return build


def _shard_link_out(case, out):
    wm = {n: "model-00001-of-00001.safetensors" for n in tensors(case)}
    (case / "model.safetensors").unlink()
    link(case, "model-00001-of-00001.safetensors", out / "secret.safetensors")
    index(case, wm)


def _fifo_config(case, out):
    (case / "config.json").unlink()
    os.mkfifo(case / "config.json")


def _own_tokenizer_gone(case):
    for p in case.glob("tokenizer.tiktoken*"):
        p.unlink()


def _q(name):  # quantized tensors of layer 0's w1
    return f"transformer.blocks.0.ffn.experts.mlp.w1.{name}"


def _set(name, value):
    def fn(t):
        t[name] = t[name].clone()
        t[name].view(-1)[:3] = value
    return fn


def _blocks_scales(value, what="experts"):
    """Set the first scales of layer 0's stored kernel bytes to ``value``: of w1 in every expert's slot
    image (so any token meets one), or of attention's Wqkv."""
    def fn(t):
        cfg = DbrxConfig.from_json(DEMO / "config.json")
        mq = ModuleQuant(4, 128, False)
        if what == "experts":
            name = "transformer.blocks.0.ffn.experts.mlp.qblocks"
            slot = expert_slot(cfg, mq)
            t[name] = t[name].clone()
            for e in range(t[name].shape[0]):
                w1, v1, w2 = slot.unpack(t[name][e])
                w1.scales.view(-1)[:3] = value
                t[name][e] = slot.pack(w1, v1, w2)
            return
        name = "transformer.blocks.0.norm_attn_norm.attn.Wqkv.qblocks"
        qt = blocks.unpack(t[name], 8, cfg.qkv_out_features, cfg.d_model, -1, False)
        qt.scales.view(-1)[:3] = value
        b = blocks.pack(qt)
        t[name] = t[name].clone()
        t[name][: b.numel()] = b
    return fn


def _qc(field, value):
    return lambda case, out: edit_config(case, lambda d: d["quantization_config"]["experts"].__setitem__(field, value))


OUTSIDE = "points outside"
LINK = "is a link to a file outside"
# (id, base, builder(case, outside), {entry: message} or message for every entry)
CASES = [
    # -- confinement: nothing outside the folder is read, whatever the checkpoint names
    ("index-dotdot", "float", _index_to(lambda c, o: "../outside/secret.safetensors"), OUTSIDE),
    ("index-absolute", "float", _index_to(lambda c, o: str(o / "secret.safetensors")), OUTSIDE),
    ("index-etc-passwd", "float", _index_to(lambda c, o: "../../../../../../../etc/passwd"), OUTSIDE),
    ("index-dotdot-inside", "float", _index_to(lambda c, o: "sub/../model.safetensors"), OUTSIDE),
    ("index-tilde", "float", _index_to(lambda c, o: "~/secret.safetensors"), OUTSIDE),
    ("shard-link-out", "float", lambda c, o: link(c, "model.safetensors", o / "secret.safetensors"), LINK),
    ("indexed-shard-link-out", "float", _shard_link_out, LINK),
    ("index-link-out", "float", lambda c, o: (index(c), link(c, "model.safetensors.index.json", o / "index.json")), LINK),
    ("config-link-out", "float", lambda c, o: link(c, "config.json", o / "config.json"), LINK),
    ("config-dev-zero", "float", lambda c, o: link(c, "config.json", Path("/dev/zero")), LINK),
    ("config-fifo", "float", _fifo_config, "not a regular file"),
    ("tokenizer-link-out", "float", lambda c, o: link(c, "tokenizer.tiktoken", o / "secret.txt"),
     {"load": LINK, "run": LINK, "eval": LINK, "quantize": LINK}),
    ("sidecar-link-out", "float", lambda c, o: link(c, "tokenizer.tiktoken.json", o / "secret.txt"), LINK),
    ("tokenizer-json-link-out", "float", lambda c, o: (_own_tokenizer_gone(c), link(c, "tokenizer.json", o / "secret.txt")),
     LINK),
    ("index-duplicate-key", "float", lambda c, o: index(c, text='{"weight_map": {"transformer.wte.weight": '
                                                                 '"model.safetensors", "transformer.wte.weight": "x"}}'),
     "appears twice"),
    ("tensor-in-two-shards", "float", lambda c, o: _split_shards(c), "is in two shards"),
    # -- config.json: types, ranges, structure
    ("rope-theta-string", "float", lambda c, o: edit_config(c, lambda d: d["attn_config"].__setitem__("rope_theta", "5e5")),
     "field attn_config.rope_theta must be a finite positive number"),
    ("rope-theta-infinity", "float", lambda c, o: edit_config(
        c, text=(DEMO / "config.json").read_text().replace('"rope_theta": 500000', '"rope_theta": Infinity', 1)),
     "Infinity is not a JSON number"),
    ("rope-theta-1e400", "float", lambda c, o: edit_config(
        c, text=(DEMO / "config.json").read_text().replace('"rope_theta": 500000', '"rope_theta": 1e400', 1)),
     "the number 1e400 is beyond the range of a double"),
    ("clip-qkv-string", "float", lambda c, o: edit_config(c, lambda d: d["attn_config"].__setitem__("clip_qkv", "8")),
     "field attn_config.clip_qkv must be"),
    ("eos-string", "float", lambda c, o: edit_config(c, lambda d: d.__setitem__("eos_token_id", "1528")),
     "field eos_token_id must be an integer"),
    ("eos-beyond-any-vocab", "float", lambda c, o: edit_config(c, lambda d: d.__setitem__("eos_token_id",
                                                                                          [1528, 2**31])),
     r"field eos_token_id\[1\] must be an integer in \[0, 2147483647\]"),
    ("attn-config-list", "float", lambda c, o: edit_config(c, lambda d: d.__setitem__("attn_config", [8, 2])),
     "field attn_config must be an object"),
    ("tie-embeddings-string", "float", lambda c, o: edit_config(c, lambda d: d.__setitem__("tie_word_embeddings", "false")),
     "field tie_word_embeddings must be true or false"),
    ("n-layers-float", "float", lambda c, o: edit_config(c, lambda d: d.__setitem__("n_layers", 4.0)),
     "field n_layers must be an integer"),
    ("d-model-bool", "float", lambda c, o: edit_config(c, lambda d: d.__setitem__("d_model", True)),
     "field d_model must be an integer"),
    ("config-deeply-nested", "float", lambda c, o: edit_config(
        c, text=(DEMO / "config.json").read_text().replace("{", '{"junk": ' + nested(100000) + ",", 1)),
     "nested 100001 levels deep"),
    ("config-array", "float", lambda c, o: edit_config(c, text="[1, 2, 3]"), "must be a JSON object"),
    ("config-huge", "float", lambda c, o: edit_config(c, text=(DEMO / "config.json").read_text() + " " * (5 << 20)),
     "more than the 4194304 such a file may have"),
    ("config-not-utf8", "float", lambda c, o: edit_config(c, text=b'{"d_model": "\xff\xfe"}'), "not valid JSON"),
    ("config-duplicate-key", "float", lambda c, o: edit_config(
        c, text=(DEMO / "config.json").read_text().replace('"n_layers": 4', '"n_layers": 4, "n_layers": 2', 1)),
     "key 'n_layers' appears twice"),
    ("vocab-size-huge", "float", lambda c, o: edit_config(c, lambda d: d.__setitem__("vocab_size", 10**12)),
     "field vocab_size must be an integer in"),
    ("n-layers-million", "float", lambda c, o: edit_config(c, lambda d: d.__setitem__("n_layers", 1000000)),
     r"field n_layers must be an integer in \[1, 1024\]"),
    ("n-layers-more-than-held", "float", lambda c, o: edit_config(c, lambda d: d.__setitem__("n_layers", 1000)),
     "config.json says n_layers 1000; the checkpoint holds 4 blocks"),
    # -- the index and the safetensors headers
    ("index-list", "float", lambda c, o: index(c, text="[1, 2]"), "has no 'weight_map'"),
    ("index-int-values", "float", lambda c, o: index(c, {"transformer.wte.weight": 3}), "has no 'weight_map'"),
    ("index-deeply-nested", "float", lambda c, o: index(c, text='{"weight_map": {}, "m": ' + nested(50000) + "}"),
     "nested 50001 levels deep"),
    ("index-lacks-tensor", "float", lambda c, o: index(c, {n: "model.safetensors" for n in tensors(c)
                                                             if "blocks.3.ffn.router" not in n}),
     "transformer.blocks.3.ffn.router.layer.weight not found|not in the checkpoint, e.g. "
     "transformer.blocks.3.ffn.router.layer.weight"),
    ("header-offsets-strings", "float", lambda c, o: edit_header(
        c / "model.safetensors", lambda h: h["transformer.wte.weight"].__setitem__("data_offsets", ["0", "10"])),
     "transformer.wte.weight has a malformed header entry"),
    ("header-dtype-int", "float", lambda c, o: edit_header(
        c / "model.safetensors", lambda h: h["transformer.wte.weight"].__setitem__("dtype", 7)), "malformed header entry"),
    ("header-shape-negative", "float", lambda c, o: edit_header(
        c / "model.safetensors", lambda h: h["transformer.wte.weight"].__setitem__("shape", [-1, 128])),
     "malformed header entry"),
    ("header-unknown-dtype", "float", lambda c, o: edit_header(
        c / "model.safetensors", lambda h: h["transformer.wte.weight"].__setitem__("dtype", "F7")),
     "dtype 'F7', which dbrxq cannot read"),
    ("header-deeply-nested", "float", lambda c, o: edit_header(
        c / "model.safetensors", lambda h: json.dumps(h).replace("{", '{"__metadata__": ' + nested(20000) + ",", 1).encode()),
     "nested 20001 levels deep"),
    ("header-duplicate-tensor", "float", lambda c, o: edit_header(
        c / "model.safetensors", lambda h: json.dumps(h).replace(
            '"transformer.norm_f.weight"', '"transformer.wte.weight"', 1).encode()),
     "key 'transformer.wte.weight' appears twice"),
    ("header-overlapping-tensors", "float", lambda c, o: edit_header(
        c / "model.safetensors", lambda h: h["transformer.norm_f.weight"].__setitem__(
            "data_offsets", [h["transformer.wte.weight"]["data_offsets"][0],
                             h["transformer.wte.weight"]["data_offsets"][0] + 256])), "overlap in the file"),
    ("shard-truncated", "float", lambda c, o: (c / "model.safetensors").write_bytes(
        (c / "model.safetensors").read_bytes()[:-1000]), "is truncated"),
    # -- tokenizer files
    ("sidecar-string-id", "float", lambda c, o: (c / "tokenizer.tiktoken.json").write_text(
        json.dumps({**json.loads((DEMO / "tokenizer.tiktoken.json").read_text()), "pad_token_id": "1533"})),
     "field pad_token_id must be an integer"),
    ("tiktoken-huge-rank", "float", lambda c, o: (c / "tokenizer.tiktoken").write_text(
        (DEMO / "tokenizer.tiktoken").read_text() + "YWJjZGVmZw== 99999999999\n"), "with a rank below 4194304"),
    # -- numbers: poisoned weights are never generated from, quantized or exported
    ("nan-expert", "float", lambda c, o: rewrite(c, _set("transformer.blocks.2.ffn.experts.mlp.v1", float("nan"))),
     {"load": None, "run": "not finite .* layer 2's experts", "eval": "not finite .* layer 2's experts",
      "quantize": r"transformer.blocks.2.ffn.experts.mlp.v1 holds 3 NaN/Inf value"}),
    ("inf-norm", "float", lambda c, o: rewrite(c, _set("transformer.blocks.1.norm_attn_norm.norm_2.weight", float("inf"))),
     {"load": None, "run": "not finite .* layer 1's attention block", "eval": "not finite .* layer 1's attention block",
      "quantize": "norm_2.weight holds 3 NaN/Inf value"}),
    # -- quantized checkpoints: quantization_config and the numbers of the codes
    ("qc-bits-float", "quant", _qc("bits", 4.0), "quantization_config.experts.bits=4.0 has the wrong JSON type"),
    ("qc-group-size-float", "quant", _qc("group_size", 128.0),
     "quantization_config.experts.group_size=128.0 has the wrong JSON type"),
    ("qc-bits-3-in-v1", "quant", _qc("bits", 3), "format_version=1 cannot hold 2- or 3-bit codes"),
    ("qc-bits-5", "quant", _qc("bits", 5), "bits=5 is not supported"),
    ("qc-symmetric-string", "quant", _qc("symmetric", "yes"), "symmetric='yes' has the wrong JSON type"),
    ("qc-format-version-string", "quant", lambda c, o: edit_config(
        c, lambda d: d["quantization_config"].__setitem__("format_version", "1")), "format_version='1' is not supported"),
    ("qc-list", "quant", lambda c, o: edit_config(c, lambda d: d.__setitem__("quantization_config", [4])),
     "field quantization_config must be an object"),
    ("scales-nan", "quant", lambda c, o: rewrite(c, _set(_q("scales"), float("nan"))),
     r"mlp.w1.scales: 3 scale\(s\) not finite and positive"),
    ("scales-inf", "quant", lambda c, o: rewrite(c, _set(_q("scales"), float("inf"))), "not finite and positive"),
    ("scales-zero", "quant", lambda c, o: rewrite(c, _set(_q("scales"), 0.0)), "not finite and positive"),
    ("scales-negative", "quant", lambda c, o: rewrite(c, _set(_q("scales"), -0.01)), "not finite and positive"),
    ("zero-points-out-of-range", "quant", lambda c, o: rewrite(c, _set(_q("qzeros"), 200)),
     "zero points up to 200, beyond the 4-bit code range"),
    ("qweight-misshapen", "quant", lambda c, o: rewrite(c, lambda t: t.__setitem__(_q("qweight"), t[_q("qweight")][:, :-1].contiguous())),
     "mlp.w1.qweight has shape"),
    ("qweight-float", "quant", lambda c, o: rewrite(c, lambda t: t.__setitem__(_q("qweight"), t[_q("qweight")].float())),
     "mlp.w1.qweight has dtype torch.float32, expected torch.uint8"),
    # -- the blocks layout: the kernel's bytes, checked on first use (a load maps them, reads nothing)
    ("blocks-expert-scales-nan", "blocks", lambda c, o: rewrite(c, _blocks_scales(float("nan"))),
     {"load": None, "run": r"mlp.qblocks: expert \d+ w1: 3 scale\(s\) not finite and positive",
      "eval": r"expert \d+ w1: 3 scale\(s\) not finite"}),
    ("blocks-expert-scales-negative", "blocks", lambda c, o: rewrite(c, _blocks_scales(-1.0)),
     {"load": None, "run": "not finite and positive", "eval": "not finite and positive"}),
    ("blocks-attn-scales-inf", "blocks", lambda c, o: rewrite(c, _blocks_scales(float("inf"), "attn")),
     {"load": None, "run": r"Wqkv.qblocks: 3 scale\(s\) not finite", "eval": "not finite and non-zero"}),
    ("blocks-attn-scales-minus-zero", "blocks", lambda c, o: rewrite(c, _blocks_scales(-0.0, "attn")),
     {"load": None, "run": r"Wqkv.qblocks: 3 scale\(s\) not finite and non-zero", "eval": "not finite and non-zero"}),
    ("blocks-misshapen", "blocks", lambda c, o: rewrite(c, lambda t: t.__setitem__(
        _b(), t[_b()][:, :-4096].contiguous())), "mlp.qblocks has shape"),
    ("blocks-float", "blocks", lambda c, o: rewrite(c, lambda t: t.__setitem__(_b(), t[_b()].float())),
     "mlp.qblocks has dtype torch.float32, expected torch.uint8"),
    ("blocks-in-v3", "blocks", lambda c, o: edit_config(
        c, lambda d: d["quantization_config"].__setitem__("format_version", 3)), "format_version=3 cannot hold the blocks"),
    ("blocks-layout-unknown", "blocks", lambda c, o: edit_config(
        c, lambda d: d["quantization_config"].__setitem__("layout", "rows")), "layout='rows' is not supported"),
    ("blocks-named-canonical", "blocks", lambda c, o: edit_config(
        c, lambda d: d["quantization_config"].__setitem__("layout", "canonical")), "not in the checkpoint"),
]


def _b():  # layer 0's stored experts (blocks layout)
    return "transformer.blocks.0.ffn.experts.mlp.qblocks"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(DEMO / "model.safetensors", outside / "secret.safetensors")
    shutil.copy(DEMO / "config.json", outside / "config.json")
    (outside / "secret.txt").write_text("SECRET-CONTENT-1234\n")
    (outside / "index.json").write_text(json.dumps({"weight_map": {n: "model.safetensors"
                                                                   for n in load_file(DEMO / "model.safetensors")}}))
    quant = quantize_checkpoint(DEMO, root / "quant", QuantConfig(experts=ModuleQuant(4, 128, False), layout="canonical"),
                                progress=False)
    blocks_ = quantize_checkpoint(DEMO, root / "blocks", QuantConfig(experts=ModuleQuant(4, 128, False), layout="blocks"),
                                  progress=False)
    text = root / "text.txt"
    text.write_text((DEMO.parents[2] / "README.md").read_text() if (DEMO.parents[2] / "README.md").exists()
                    else "The function returns a list. " * 50)
    return {"float": DEMO, "quant": quant, "blocks": blocks_, "outside": outside, "root": root, "text": text}


@pytest.mark.parametrize("cid, base, build, expect", CASES, ids=[c[0] for c in CASES])
def test_hostile_checkpoint(cid, base, build, expect, bases, tmp_path, monkeypatch, capsys, dbrxq_main):
    case = tmp_path / "case"
    shutil.copytree(bases[base], case)
    build(case, bases["outside"])
    entries = ALL if base == "float" else QUANT_ENTRIES
    expects = expect if isinstance(expect, dict) else dict.fromkeys(entries, expect)
    watch = OpenWatch(bases["outside"])
    said = []  # every message, checked for the content of what was refused
    try:
        for entry in entries:
            message = expects[entry]
            if entry == "load":
                if message is None:
                    dbrxq.load(case)  # loads; the poison is caught where it would be used
                    continue
                with pytest.raises(DbrxqError) as e:
                    dbrxq.load(case)
                text = str(e.value)
                said.append(text)
                assert "\n" not in text, text
                assert __import__("re").search(message, text), (entry, text)
                continue
            out = tmp_path / f"out-{entry}"
            args = {"run": ["run", str(case), "--prompt", "The function", "-n", "3"],
                    "eval": ["eval", str(case), "--data", str(bases["text"]), "--max-tokens", "64"],
                    "quantize": ["quantize", str(case), str(out), "--method", "rtn"]}[entry]
            code, err = dbrxq_main(*args)
            said.append(err)
            errors = [line for line in err.splitlines() if line.startswith("error: ")]
            assert code == 2 and len(errors) == 1 and "Traceback" not in err, (entry, code, err[-2000:])
            assert __import__("re").search(message, errors[0]), (entry, errors[0])
            assert not (out / "config.json").exists()  # nothing that looks complete
        opened = watch.opened()
        assert opened == [], f"files outside the case folder were opened: {opened}"
    finally:
        watch.close()
    assert not any("SECRET-CONTENT" in t for t in said)  # never quotes what it refused to read


def test_the_open_watch_sees_opens(tmp_path):
    """The corpus's "nothing outside was opened" can fail: the watch reports an open by Python and
    one by Rust's safetensors (mmap through its own open)."""
    from safetensors import safe_open
    (tmp_path / "a.txt").write_text("x")
    shutil.copy(DEMO / "model.safetensors", tmp_path / "m.safetensors")
    watch = OpenWatch(tmp_path)
    try:
        (tmp_path / "a.txt").read_text()
        with safe_open(str(tmp_path / "m.safetensors"), framework="pt"):
            pass
        assert {"a.txt", "m.safetensors"} <= set(watch.opened())
    finally:
        watch.close()


def test_corpus_size():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_hub_snapshot_links_into_blobs_are_inside(tmp_path, bases):
    """A hub snapshot's files are links to ../../blobs: allowed; a snapshot link anywhere else (out
    of the cache, or elsewhere in the repo's cache folder) is refused."""
    repo = tmp_path / "hub" / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in DEMO.iterdir():
        shutil.copy(p, blobs / p.name)
        (snap / p.name).symlink_to(Path("../../blobs") / p.name)
    runner = dbrxq.load(snap)
    assert runner.generate("The function", max_new_tokens=2)
    for target in (bases["outside"] / "config.json", repo / "elsewhere.json"):  # outside, or beside blobs
        shutil.copy(DEMO / "config.json", repo / "elsewhere.json")
        (snap / "config.json").unlink()
        (snap / "config.json").symlink_to(target)
        with pytest.raises(DbrxqError, match="is a link to a file outside"):
            dbrxq.load(snap)


def test_happy_path_unchanged_bit_for_bit():
    """The checks change no result: the demo model's logits equal a plain load's."""
    from dbrxq import DbrxForCausalLM
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    a = dbrxq.load(None, dtype="float32").model(ids).logits
    b = DbrxForCausalLM.from_pretrained(DEMO, dtype="float32")(ids).logits
    assert torch.equal(a, b)
