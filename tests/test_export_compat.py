"""Exports that mlx-lm and MLX Swift build as we do (issue 22): layers the group size cannot divide stay in float,
listed `false`; a hybrid's layer kinds follow `full_attention_interval`, or the export is refused (or marked ours
only); the Swift checker catches each loading rule broken; a CLI failure is one red line, never a traceback."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from helpers import edit_config, moe_config, save_checkpoint, save_hybrid

from qwen3_mlx.fit import predict
from qwen3_mlx.loader import load_config, load_model
from qwen3_mlx.quantize import QuantSpec, check_export, convert, quality_report, quantize_model
from qwen3_mlx.quantize.hybrid import export_hybrid
from qwen3_mlx.quantize.quality import DEFAULT_TEXT, report_tokens

IDS = mx.array([[5, 17, 42, 99, 7, 300, 12, 8]])
IRREGULAR = ["linear_attention", "full_attention", "full_attention", "linear_attention"]  # no interval gives it
# Expert widths 64 does not divide: routed 48, shared 80 (Qwen3-Next's dense layer 1: intermediate 96).
UNGROUPED = {
    "qwen3_moe": lambda p: save_checkpoint(p, moe_config(moe_intermediate_size=48), moe=True, tokenizer=True),
    "qwen3_next": lambda p: save_hybrid(p, tokenizer=True, next_=True, moe_intermediate_size=48,
                                        shared_expert_intermediate_size=80),
    "qwen3_5_moe": lambda p: save_hybrid(p, tokenizer=True, moe=True, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=80),
}


def rel(a, b) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / np.abs(b).max())


def export(src, out, spec=QuantSpec(), **kw):
    lines = []
    run = convert if load_config(src)["model_type"] == "qwen3_moe" else export_hybrid
    run(src, out, spec, log=lines.append, **kw)
    return lines


def quantize_cli(*args):
    return subprocess.run([sys.executable, "-m", "qwen3_mlx", "quantize", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module", params=list(UNGROUPED))
def ungrouped(request, tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("out") / "q4"
    UNGROUPED[request.param](src)
    return src, out, export(src, out)


def test_ungroupable_layers_stay_float_and_load_alike_in_mlx_lm(ungrouped):
    """Group 64: the layers whose input width it does not divide (the expert stacks included) are float in the
    shards and `false` in the config, one line says how many; mlx_lm.load gives our logits; Swift's rules hold."""
    import mlx_lm

    src, out, lines = ungrouped
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(mx.load(str(f)))
    float_layers = {n[: -len(".weight")] for n, w in tensors.items() if n.endswith(".weight") and w.ndim >= 2
                    and "conv1d" not in n and n.replace(".weight", ".scales") not in tensors}
    quantization = load_config(out)["quantization"]
    assert float_layers == {k for k, v in quantization.items() if v is False}
    assert all(tensors[f"{p}.weight"].shape[-1] % 64 for p in float_layers)
    assert any(p.endswith("switch_mlp.down_proj") for p in float_layers)
    (line,) = [line for line in lines if "stay in float" in line]
    assert line.startswith(f"{len(float_layers)} layer(s) stay in float") and line.split("e.g. ")[1] in float_layers
    ours, _ = load_model(out, dtype=mx.float32)
    theirs, _ = mlx_lm.load(str(out))
    assert rel(ours(IDS), theirs(IDS)) <= 1e-4
    assert check_export(out) == []


def test_fit_and_quality_report_count_them_as_float(ungrouped):
    """fit's weight bytes (float32 source) match the files; the layer-by-layer quality report equals KL computed
    from both whole models, so it ran those layers in float as the loader does."""
    src, out, _ = ungrouped
    actual = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    predicted = predict(load_config(src), spec=QuantSpec(), dtype_bytes=4).weight_bytes
    assert abs(predicted - actual) / actual < 0.01
    report = quality_report(src, out, max_tokens=16)
    ids = mx.array(report_tokens(out, load_config(src)["vocab_size"], DEFAULT_TEXT, 16))[None]
    ref, quant = (np.array(load_model(p, dtype=mx.float32)[0](ids)[0], dtype=np.float64) for p in (src, out))
    logp, logq = (x - x.max(-1, keepdims=True) for x in (ref, quant))
    logp, logq = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (logp, logq))
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    assert abs(report.kl_mean - kl.mean()) <= 1e-3 * kl.mean()


def test_in_memory_quantization_still_refuses_a_width_it_cannot_group(ungrouped):
    """Only exports leave such layers in float; quantize_model (bench, random models) keeps its error."""
    from qwen3_mlx.quantize import QuantizeError

    model, _ = load_model(ungrouped[0], lazy=True)
    with pytest.raises(QuantizeError, match="does not divide the input dimension"):
        quantize_model(model, spec=QuantSpec())


def test_layer_types_that_follow_an_interval_export_with_it(tmp_path):
    """linear, linear, full, linear is interval 3: the export says so and mlx-lm builds the same model."""
    import mlx_lm

    kinds = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
    save_hybrid(tmp_path / "src", tokenizer=True, layer_types=kinds)
    export(tmp_path / "src", tmp_path / "out", QuantSpec(group_size=32))
    text = load_config(tmp_path / "out")["text_config"]
    assert text["full_attention_interval"] == 3 and text["layer_types"] == kinds
    ours, _ = load_model(tmp_path / "out", dtype=mx.float32)
    theirs, _ = mlx_lm.load(str(tmp_path / "out"))
    assert rel(ours(IDS), theirs(IDS)) <= 1e-4
    assert check_export(tmp_path / "out") == []


def test_irregular_layer_types_refused_then_exported_for_qwen3_mlx_only(tmp_path):
    """No interval gives linear, full, full, linear: one line naming the loaders and the flag, nothing written;
    with --allow-incompatible the folder says it is ours only, our runtime builds its layers as the source's (the
    export's logits equal in-memory quantization of the source), the checker and mlx-lm refuse it."""
    import mlx_lm

    src, out = tmp_path / "src", tmp_path / "out"
    save_hybrid(src, tokenizer=True, layer_types=IRREGULAR)
    r = quantize_cli(src, out, "--no-eval")
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "mlx-lm and MLX Swift" in r.stderr and "--allow-incompatible" in r.stderr and not out.exists()
    r = quantize_cli(src, out, "--no-eval", "--bits", "8", "--group-size", "32", "--allow-incompatible")
    assert r.returncode == 0 and "loads in qwen3-mlx only" in r.stderr, r.stderr
    assert "mis-build" in load_config(out)["qwen3_mlx_only"]
    ours, _ = load_model(out, dtype=mx.float32)
    assert [("linear_attention" if layer.is_linear else "full_attention") for layer in ours.layers] == IRREGULAR
    ref, _ = load_model(src, dtype=mx.float32)
    quantize_model(ref, spec=QuantSpec(bits=8, group_size=32))
    assert rel(ours(IDS), ref(IDS)) <= 1e-5
    assert any("layer_types differ" in p for p in check_export(out))
    with pytest.raises(ValueError, match="parameters not in model"):
        mlx_lm.load(str(out))


def _damage(kind, folder):
    cfg_file = folder / "config.json"
    if kind == "truncated shard":
        shard = next(folder.glob("*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:-100])
    elif kind == "already quantized":
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "quantization": {"bits": 4}}))
    elif kind == "layer_types of another length":
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "layer_types": IRREGULAR[:3]}))
    elif kind == "config not JSON":
        cfg_file.write_text("{")
    elif kind in ("expert of another shape", "missing tensor"):
        import safetensors.numpy

        shard = next(folder.glob("*.safetensors"))
        t = safetensors.numpy.load_file(str(shard))
        name = next(k for k in t if ("experts.0.down_proj" if kind.startswith("expert") else "in_proj") in k)
        t[name] = t[name][:, :-1].copy()
        if kind == "missing tensor":
            del t[name]
        safetensors.numpy.save_file(t, str(shard))


@pytest.mark.parametrize("kind,args,message", [
    ("irregular layer_types", (), "--allow-incompatible"),
    ("truncated shard", (), "truncated"),
    ("already quantized", (), "already quantized"),
    ("layer_types of another length", (), "layer_types must list 4"),
    ("config not JSON", (), "not valid JSON"),
    ("expert of another shape", (), "differ in shape"),
    ("missing tensor", (), "missing tensor"),
    ("mixed recipe", ("--recipe", "mixed_4_6"), "uniform recipe only"),
    ("group size", ("--group-size", "48"), "group size 48 not supported"),
])
def test_cli_failure_is_one_red_line(tmp_path, kind, args, message):
    """Each failure `quantize` (and the loading under it) can meet on a hybrid MoE source: exit 1, one line."""
    src = tmp_path / "src"
    save_hybrid(src, moe=True, **({"layer_types": IRREGULAR} if kind == "irregular layer_types" else {}))
    _damage(kind, src)
    r = quantize_cli(src, tmp_path / "out", "--no-eval", *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_exports_ungroupable_experts_with_one_float_line(tmp_path):
    """What printed mx.quantize's traceback before: a Qwen3-Next whose expert widths 64 does not divide."""
    UNGROUPED["qwen3_next"](tmp_path / "src")
    r = quantize_cli(tmp_path / "src", tmp_path / "out", "--no-eval")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    (line,) = [line for line in r.stderr.splitlines() if "stay in float" in line]
    # layers 0, 2, 3: routed and shared down_proj (48, 80); layer 1's dense down_proj (96)
    assert line.startswith("7 layer(s) stay in float (listed false in the quantization dict): group size 64 does not")


@pytest.fixture(scope="module")
def hybrid_export(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("out") / "q"
    save_hybrid(src, tokenizer=True, moe=True, moe_intermediate_size=48, shared_expert_intermediate_size=64)
    export(src, out)
    assert check_export(out) == []
    return out


def _edit_tensors(folder, fn):
    shard = next(folder.glob("*.safetensors"))
    tensors = dict(mx.load(str(shard)))
    fn(tensors)
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})


CONV = "language_model.model.layers.0.linear_attn.conv1d.weight"
FLOAT = "language_model.model.layers.0.mlp.switch_mlp.down_proj"  # 48 wide: float, listed false
QUANTIZED = "language_model.model.layers.0.mlp.switch_mlp.up_proj"


def _entry(path, value):
    return lambda f: edit_config(f, lambda c: [c[k].update({path: value})
                                                for k in ("quantization", "quantization_config")])


RULES = {
    "mtp tensor in the shards": (lambda f: _edit_tensors(f, lambda t: t.update({"mtp.fc.weight": mx.ones((4, 4))})),
                                 "multi-token-prediction tensor makes Swift add 1 to every norm"),
    "conv1d in Hugging Face's layout": (lambda f: _edit_tensors(f, lambda t: t.update({CONV: t[CONV].swapaxes(1, 2)})),
                                        "Hugging Face's layout: Swift would transpose it and add 1 to every norm"),
    "tie_word_embeddings left to Swift's default": (
        lambda f: edit_config(f, lambda c: c["text_config"].pop("tie_word_embeddings")),
        "text_config lacks flat key 'tie_word_embeddings'"),
    "no quantization_config": (lambda f: edit_config(f, lambda c: c.pop("quantization_config")),
                               "quantization_config is not a copy of quantization"),
    "bits for a layer without scales": (_entry(FLOAT, {"bits": 4, "group_size": 64}),
                                        f"quantization[{FLOAT!r}] gives bits but there is no {FLOAT}.scales"),
    "false for a layer with scales": (_entry(QUANTIZED, False),
                                      f"{QUANTIZED} has scales but quantization[{QUANTIZED!r}] is false"),
    "layer kinds off the interval": (
        lambda f: edit_config(f, lambda c: c["text_config"].update(full_attention_interval=2)),
        "layer_types differ from the layer kinds full_attention_interval 2 builds"),
    "missing tensor": (lambda f: _edit_tensors(f, lambda t: t.pop("language_model.model.layers.0.linear_attn.A_log")),
                       "missing tensor language_model.model.layers.0.linear_attn.A_log"),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_checker_catches_each_swift_rule_on_a_hybrid(hybrid_export, tmp_path, rule):
    damage, message = RULES[rule]
    folder = tmp_path / "broken"
    shutil.copytree(hybrid_export, folder)
    damage(folder)
    problems = check_export(folder)
    assert any(message in p for p in problems), problems
