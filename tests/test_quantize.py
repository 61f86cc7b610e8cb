"""The bounded-memory exporter against in-memory quantization of the same checkpoint (transformers-written)."""

import json
import os
import subprocess
import sys
import textwrap

import importlib

import mlx.core as mx
import numpy as np
import pytest
from helpers import dense_config, moe_config, save_checkpoint
from mlx.utils import tree_flatten, tree_map

from qwen3_mlx import load_model
from qwen3_mlx.errors import Qwen3MLXError
from qwen3_mlx.quantize import QuantSpec, check_export, convert, quality_report, quantize_model
from qwen3_mlx.quantize.quality import kl_and_top1

IDS = mx.array(np.random.default_rng(3).integers(0, 1000, size=(1, 24)))


@pytest.fixture(scope="module")
def dense_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense-src")
    save_checkpoint(path, dense_config(tie_word_embeddings=True, num_hidden_layers=3), tokenizer=True)
    return path


@pytest.fixture(scope="module")
def moe_src(tmp_path_factory):
    """Multi-shard MoE source (fp32): each layer's experts spread over several input shards."""
    path = tmp_path_factory.mktemp("moe-src")
    cfg = moe_config(decoder_sparse_step=2, mlp_only_layers=[3], num_hidden_layers=4)
    save_checkpoint(path, cfg, moe=True, max_shard_size="40KB", tokenizer=True)
    return path


@pytest.fixture(scope="module")
def moe_bf16_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe-bf16-src")
    save_checkpoint(path, moe_config(), moe=True, max_shard_size="30KB", torch_dtype="bfloat16", tokenizer=True)
    return path


def in_memory(src, spec, dtype=mx.float32):
    model, _ = load_model(src, dtype=dtype)
    q = quantize_model(model, spec=spec)
    # compute in float32 like the loaded export (scales keep their stored rounding)
    model.update(tree_map(lambda p: p if p.dtype == mx.uint32 else p.astype(mx.float32), model.parameters()))
    return model, q


def test_moe_source_experts_straddle_shards(moe_src):
    wm = json.loads((moe_src / "model.safetensors.index.json").read_text())["weight_map"]
    files = {f for k, f in wm.items() if k.startswith("model.layers.1.mlp.experts.")}
    assert len(files) >= 2


SPECS = {
    "4bit-g32": QuantSpec(bits=4, group_size=32),
    "8bit-g32": QuantSpec(bits=8, group_size=32),
    "mixed_3_6": QuantSpec(recipe="mixed_3_6", group_size=32),
    "3bit-embed8-head-fp": QuantSpec(bits=3, group_size=32, embed_bits=8, lm_head_bits=0, router_bits=0),
}


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("src_name", ["dense_src", "moe_src"])
def test_export_equals_in_memory_quantization(request, tmp_path, src_name, spec_name):
    src, spec = request.getfixturevalue(src_name), SPECS[spec_name]
    result = convert(src, tmp_path / "out", spec, max_shard_size="20KB")
    assert len(result.shard_files) > 1
    ref, ref_q = in_memory(src, spec)
    ours, config = load_model(tmp_path / "out", dtype=mx.float32)
    assert config["quantization"] == ref_q
    assert config["quantization_config"] == ref_q
    np.testing.assert_array_equal(np.array(ours(IDS)), np.array(ref(IDS)))
    # every tensor identical too (not only the logits)
    a, b = dict(tree_flatten(ours.parameters())), dict(tree_flatten(ref.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.array_equal(a[k], b[k]), k


def test_bf16_multishard_moe_export(moe_bf16_src, tmp_path):
    spec = QuantSpec(bits=4, group_size=32)
    convert(moe_bf16_src, tmp_path / "out", spec, max_shard_size="25KB")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    ours, _ = load_model(tmp_path / "out", dtype=mx.float32)
    ref, _ = in_memory(moe_bf16_src, spec, dtype=mx.bfloat16)
    np.testing.assert_array_equal(np.array(ours(IDS)), np.array(ref(IDS)))
    raw = mx.load(str(next((tmp_path / "out").glob("model-00001-*.safetensors"))))
    assert {v.dtype for v in raw.values()} <= {mx.uint32, mx.bfloat16}


def test_output_layout(moe_src, tmp_path):
    out = tmp_path / "out"
    convert(moe_src, out, QuantSpec(bits=4, group_size=32), max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    assert list(wm) == sorted(wm)
    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    tensors = {}
    for s in shards:
        part = mx.load(str(s))
        assert all(wm[k] == s.name for k in part)
        tensors.update(part)
    assert set(tensors) == set(wm)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    # experts stacked, router at 8 bits
    w = tensors["model.layers.1.mlp.switch_mlp.gate_proj.weight"]
    assert w.shape == (8, 32, 64 * 4 // 32) and w.dtype == mx.uint32
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (8, 64 * 8 // 32)
    assert not any(".experts." in k for k in tensors)
    config = json.loads((out / "config.json").read_text())
    for key in ("rope_theta", "num_experts", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                "moe_intermediate_size", "num_experts_per_tok", "tie_word_embeddings", "head_dim",
                "max_position_embeddings", "rope_scaling"):
        assert key in config, key
    assert "rope_parameters" not in config and "num_local_experts" not in config
    assert config["num_experts"] == 8 and config["mlp_only_layers"] == [3]
    routers = {k: v for k, v in config["quantization"].items() if k.endswith("mlp.gate")}
    assert routers == {f"model.layers.{i}.mlp.gate": {"group_size": 32, "bits": 8, "mode": "affine"} for i in (1,)}
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] and (out / "chat_template.jinja").read_text() == tc["chat_template"]
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert check_export(out) == []


def test_mixed_recipe_bits_per_layer(dense_src, tmp_path):
    convert(dense_src, tmp_path / "out", QuantSpec(recipe="mixed_4_6", group_size=32))
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert q["bits"] == 4
    high = {k for k, v in q.items() if isinstance(v, dict) and v["bits"] == 6}
    # 3 layers: only layer 2 is "last eighth" / every third; the tied embedding is also the output head
    assert "model.embed_tokens" in high
    assert "model.layers.2.self_attn.v_proj" in high and "model.layers.2.mlp.down_proj" in high
    assert "model.layers.0.self_attn.q_proj" not in q
    assert not any("q_proj" in k or "up_proj" in k for k in high)


def no_leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "damage,message",
    [
        ("missing_shard", "missing shard"),
        ("truncated", "truncated"),
        ("model_type", "unsupported model_type"),
        ("dtype", "unsupported dtype"),
        ("missing_tensor", "missing tensor"),
    ],
)
def test_bad_source_fails_before_writing(moe_src, tmp_path, damage, message):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(moe_src, src)
    spec = QuantSpec(bits=4, group_size=32)
    shards = sorted(src.glob("*.safetensors"))
    if damage == "missing_shard":
        shards[3].unlink()
    elif damage == "truncated":
        data = shards[2].read_bytes()
        shards[2].write_bytes(data[: len(data) - 100])
    elif damage == "model_type":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama4"}))
    elif damage == "dtype":
        import safetensors.numpy

        safetensors.numpy.save_file({"model.norm.weight": np.ones(64, np.int8)}, str(shards[-1]))
    elif damage == "missing_tensor":
        import safetensors.numpy

        t = safetensors.numpy.load_file(str(shards[-1]))
        t.pop(next(iter(t)))
        t["model.unrelated"] = np.ones(2, np.float32)
        safetensors.numpy.save_file(t, str(shards[-1]))
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    with pytest.raises(Qwen3MLXError, match=message):
        convert(src, out_parent / "out", spec)
    assert list(out_parent.iterdir()) == []


def test_existing_out_refused_then_forced(dense_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(Qwen3MLXError, match="already exists"):
        convert(dense_src, out)
    assert (out / "keep.txt").is_file()
    convert(dense_src, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert no_leftovers(tmp_path)


def test_interrupted_run_leaves_nothing_at_out(dense_src, tmp_path):
    def interrupt(done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(dense_src, tmp_path / "out", QuantSpec(bits=4, group_size=32), max_shard_size="20KB",
                progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_killed_run_never_looks_finished(dense_src, tmp_path):
    """SIGKILL mid-write (no cleanup possible): OUT does not exist; only a hidden partial folder remains."""
    script = textwrap.dedent(f"""
        import os, signal
        from qwen3_mlx.quantize import convert
        def die(done, total):
            if done > total // 2:
                os.kill(os.getpid(), signal.SIGKILL)
        convert({str(dense_src)!r}, {str(tmp_path / 'out')!r}, max_shard_size="20KB", progress=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == -9
    assert not (tmp_path / "out").exists()
    assert all(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe-sharded"])
def test_streaming_keeps_mlx_memory_at_row_blocks(tmp_path, monkeypatch, moe):
    """With 256 KB row blocks, converting a ~20 MB model never holds more than a few blocks in MLX."""
    src = tmp_path / "src"
    kw = dict(vocab_size=16000, hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64)
    if moe:
        save_checkpoint(src, moe_config(**kw, moe_intermediate_size=256, num_experts=16), moe=True,
                        max_shard_size="5MB")
    else:
        save_checkpoint(src, dense_config(**kw))
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert size > 20e6
    monkeypatch.setattr(importlib.import_module("qwen3_mlx.quantize.convert"), "CHUNK_BYTES", 256 << 10)
    mx.clear_cache()
    mx.reset_peak_memory()
    convert(src, tmp_path / "out", QuantSpec(bits=4, group_size=64))
    peak = mx.get_peak_memory()
    print(f"source {size / 1e6:.1f} MB ({'moe' if moe else 'dense'}), MLX peak during convert {peak / 1e6:.2f} MB")
    assert peak < 3e6


def test_quality_report_matches_full_models(dense_src, tmp_path):
    reports = {}
    for bits in (8, 3):
        out = tmp_path / f"q{bits}"
        convert(dense_src, out, QuantSpec(bits=bits, group_size=32))
        reports[bits] = quality_report(dense_src, out, max_tokens=40)
    # independent: both whole models through the normal loader on the same tokens
    from qwen3_mlx.quantize.quality import DEFAULT_TEXT, report_tokens

    ids = mx.array(report_tokens(tmp_path / "q3", 1000, DEFAULT_TEXT, 40))[None]
    a, _ = load_model(dense_src, dtype=mx.float32)
    b, _ = load_model(tmp_path / "q3", dtype=mx.float32)
    kl, top1 = kl_and_top1(np.array(a(ids)[0]), np.array(b(ids)[0]))
    r = reports[3]
    print(f"QUALITY 8-bit: {reports[8]}\nQUALITY 3-bit: {r}")
    assert r.tokens == 40
    assert r.kl_mean == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-6)
    assert r.top1_agreement == pytest.approx(top1)
    assert reports[8].kl_mean < r.kl_mean
    assert reports[8].top1_agreement >= r.top1_agreement


def test_cli_quantize_check_and_errors(dense_src, tmp_path):
    from typer.testing import CliRunner

    from qwen3_mlx.cli import app

    runner = CliRunner()
    out = tmp_path / "out"
    r = runner.invoke(app, ["quantize", str(dense_src), str(out), "--bits", "8", "--group-size", "32"])
    assert r.exit_code == 0, r.output
    assert "quality: KL" in r.output and "top-1 agreement" in r.output
    r = runner.invoke(app, ["quantize", "--check", str(out)])
    assert r.exit_code == 0 and "loadable by MLX Swift" in r.output
    r = runner.invoke(app, ["quantize", str(dense_src), str(out)])
    assert r.exit_code != 0 and isinstance(r.exception, Qwen3MLXError)
    # --fit picks the best candidate: a tiny model fits at 8 bits
    r = runner.invoke(app, ["quantize", str(dense_src), str(tmp_path / "fit"), "--fit", "iphone-15-pro", "--no-eval",
                            "--group-size", "32"])
    assert r.exit_code == 0, r.output
    q = json.loads((tmp_path / "fit" / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (8, 32)


@pytest.mark.parametrize("layout", ["src-in-out", "out-is-src", "out-in-src"])
def test_out_overlapping_source_refused_even_with_force(dense_src, tmp_path, layout):
    """`quantize models/Qwen3-8B models --force` must not rename and delete the folder holding the source."""
    import shutil

    parent = tmp_path / "models"
    src = parent / "Qwen3-tiny"
    shutil.copytree(dense_src, src)
    out = {"src-in-out": parent, "out-is-src": src, "out-in-src": src / "q4"}[layout]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(Qwen3MLXError, match="inside|is the source"):
        convert(src, out, QuantSpec(bits=4, group_size=32), force=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # the same through the CLI: one line, exit 1, source intact
    from typer.testing import CliRunner

    from qwen3_mlx.cli import app

    r = CliRunner().invoke(app, ["quantize", str(src), str(out), "--force", "--no-eval"])
    assert r.exit_code != 0 and isinstance(r.exception, Qwen3MLXError)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_failed_write_closes_shard_file(dense_src, tmp_path, monkeypatch):
    """An error inside a shard (here: a write past a tensor's end) leaves no open file descriptor behind."""
    from qwen3_mlx.quantize import convert as convert_mod

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    def bad_write(unit, reader, writer, dtype, progress):
        writer.write(unit.outputs[0].name, unit.outputs[0].nbytes, mx.zeros((4,)))

    monkeypatch.setattr(importlib.import_module("qwen3_mlx.quantize.convert"), "_write_unit", bad_write)
    n = open_fds()
    with pytest.raises(ValueError, match="write past the end"):
        convert_mod(dense_src, tmp_path / "out", QuantSpec(bits=4, group_size=32))
    assert open_fds() == n
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "tokenizer_config.json", "config.json"])
@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_check_reports_broken_json_as_a_problem(dense_src, tmp_path, name, content):
    out = tmp_path / "out"
    convert(dense_src, out, QuantSpec(bits=8, group_size=32))
    assert check_export(out) == []
    (out / name).write_text(content)
    problems = check_export(out)
    assert any(p.startswith(name) for p in problems), problems
    from typer.testing import CliRunner

    from qwen3_mlx.cli import app

    r = CliRunner().invoke(app, ["quantize", "--check", str(out)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert name in r.output
