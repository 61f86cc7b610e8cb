"""Exports load in mlx-lm as they are (same logits as ours) and satisfy MLX Swift's loading rules."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from helpers import dense_config, edit_config, moe_config, save_checkpoint
from mlx.utils import tree_flatten

from qwen3_mlx import load_model
from qwen3_mlx.quantize import QuantSpec, check_export, convert
from qwen3_mlx.quantize.check import swift_modules

IDS = mx.array(np.random.default_rng(5).integers(0, 1000, size=(1, 20)))

SOURCES = {
    "dense-untied": (dense_config(), False, {}),
    "dense-tied-yarn": (
        dense_config(tie_word_embeddings=True, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 16}),
        False, {},
    ),
    "moe-sharded": (moe_config(decoder_sparse_step=2, mlp_only_layers=[3]), True, {"max_shard_size": "40KB"}),
}


@pytest.fixture(scope="module", params=list(SOURCES))
def export(request, tmp_path_factory):
    cfg, moe, kw = SOURCES[request.param]
    src = tmp_path_factory.mktemp(request.param)
    save_checkpoint(src, cfg, moe=moe, tokenizer=True, **kw)
    out = tmp_path_factory.mktemp("out") / "q"
    convert(src, out, QuantSpec(recipe="mixed_4_6", group_size=32, router_bits=8), max_shard_size="30KB")
    return request.param, src, out


def test_mlx_lm_loads_export_with_same_logits(export):
    import mlx_lm

    _, _, out = export
    theirs, tokenizer = mlx_lm.load(str(out))
    ours, _ = load_model(out, dtype=mx.float32)
    a = np.array(ours(IDS))
    b = np.array(theirs(IDS).astype(mx.float32))
    print(f"mlx-lm vs ours max|diff| {np.abs(a - b).max():.2e}")
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)  # measured ~2e-6: float32 rounding of a different op order
    assert tokenizer.encode("hello")  # the tokenizer loads too


def test_export_passes_swift_rules(export):
    _, _, out = export
    assert check_export(out) == []


def test_swift_module_set_equals_our_strict_loader(export):
    """Two independent descriptions of the tensor set (Swift's declarations, our MLX modules) agree."""
    _, _, out = export
    config = json.loads((out / "config.json").read_text())
    ours, _ = load_model(out, lazy=True)
    modules = {k.rsplit(".", 1)[0] for k, _ in tree_flatten(ours.parameters())}
    assert modules == set(swift_modules(config))


def _copy(out, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(out, dst)
    return dst


def test_checker_catches_missing_flat_key(export, tmp_path):
    name, _, out = export
    dst = _copy(out, tmp_path)
    key = "num_experts" if name.startswith("moe") else "tie_word_embeddings"
    edit_config(dst, lambda c: c.pop(key))
    assert any(key in p for p in check_export(dst))


def test_checker_catches_undeclared_override(export, tmp_path):
    """Drop one per-layer override: Swift would read the layer with default bits; shapes disagree."""
    _, _, out = export
    dst = _copy(out, tmp_path)

    def drop(c):
        key = next(k for k, v in c["quantization"].items() if isinstance(v, dict))
        del c["quantization"][key]
        c["quantization_config"] = c["quantization"]

    edit_config(dst, drop)
    problems = check_export(dst)
    assert problems and any("imply" in p for p in problems)


def test_checker_catches_extra_and_missing_tensors(export, tmp_path):
    _, _, out = export
    dst = _copy(out, tmp_path)
    last = sorted(dst.glob("model-*.safetensors"))[-1]
    tensors = dict(mx.load(str(last)))
    removed = sorted(tensors)[0]
    tensors.pop(removed)
    tensors["model.global_scale"] = mx.ones((1,))
    mx.save_safetensors(str(last), tensors, metadata={"format": "mlx"})
    problems = check_export(dst)
    assert any(f"missing tensor {removed}" == p for p in problems)
    assert any("extra tensor model.global_scale" in p for p in problems)


def test_checker_rejects_nested_rope_and_missing_template(export, tmp_path):
    _, _, out = export
    dst = _copy(out, tmp_path)
    edit_config(dst, lambda c: (c.pop("rope_theta"), c.update(rope_parameters={"rope_theta": 1e6})))
    (dst / "chat_template.jinja").unlink()
    problems = check_export(dst)
    assert any("rope_theta" in p for p in problems)
