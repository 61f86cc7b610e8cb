"""Loading: both config spellings, dtypes, hub resolution, and one clear error per kind of bad input."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from helpers import dense_config, moe_config, reference_logits, save_checkpoint

from qwen3_mlx import ModelLoadError, load, load_model
from qwen3_mlx.loader import default_dtype


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    torch_model = save_checkpoint(path, dense_config(), tokenizer=True)
    return path, torch_model


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe")
    save_checkpoint(path, moe_config(num_hidden_layers=2), moe=True, max_shard_size="40KB")
    return path


@pytest.fixture
def broken(tmp_path, dense_ckpt):
    """A fresh copy of the dense checkpoint to damage."""
    dst = tmp_path / "model"
    shutil.copytree(dense_ckpt[0], dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_classic_flat_rope_spelling(tmp_path):
    """Real Qwen3 configs: flat rope_theta and rope_scaling with "type" (pre-transformers-5)."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    torch_model = save_checkpoint(tmp_path, dense_config(rope_theta=5e5, rope_scaling=yarn))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in cfg  # transformers 5 nests; rewrite as Qwen's own config.json does
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = np.random.default_rng(0).integers(0, 1000, (1, 40))
    model, _ = load_model(tmp_path)
    np.testing.assert_allclose(np.array(model(mx.array(ids))), reference_logits(torch_model, ids), atol=1e-4)
    assert model.layers[0].self_attn.rope.mscale > 1.0  # YaRN really applied


def test_yarn_changes_logits(tmp_path, dense_ckpt):
    """A YaRN config must not silently fall back to plain RoPE."""
    path = tmp_path / "m"
    shutil.copytree(dense_ckpt[0], path)
    ids = mx.array(np.random.default_rng(0).integers(0, 1000, (1, 40)))
    plain = np.array(load_model(path)[0](ids))
    edit_config(path, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    assert np.abs(np.array(load_model(path)[0](ids)) - plain).max() > 1e-3


def test_num_experts_both_spellings(moe_ckpt):
    cfg = json.loads((moe_ckpt / "config.json").read_text())
    assert "num_local_experts" in cfg  # transformers 5 spelling
    model, _ = load_model(moe_ckpt)
    assert model.args.num_experts == 8
    assert model.layers[0].mlp.switch_mlp.gate_proj.weight.shape == (8, 32, 64)


def test_load_returns_tokenizer_and_default_dtype(dense_ckpt):
    model, tokenizer = load(dense_ckpt[0])
    assert model.layers[0].self_attn.q_proj.weight.dtype == default_dtype() == mx.float32  # CPU backend
    assert tokenizer.encode("hello world") and "<|im_end|>" in tokenizer.decode(tokenizer.eos_token_ids)


def test_dtype_override(dense_ckpt):
    model, _ = load_model(dense_ckpt[0], dtype=mx.bfloat16)
    assert model.lm_head.weight.dtype == mx.bfloat16


def test_in_memory_quantized_roundtrip_via_config(tmp_path, dense_ckpt):
    """A quantized MLX folder (config `quantization` with a per-layer override and a `false` entry) loads."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from qwen3_mlx.loader import quantization_predicate

    model, cfg = load_model(dense_ckpt[0])
    q = {"group_size": 32, "bits": 4, "mode": "affine", "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8},
         "lm_head": False}
    # every quantizable layer "has scales", so the dict alone decides: defaults, an 8-bit override, one `false`
    weights_probe = {f"{p}.scales": None for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    nn.quantize(model, group_size=32, bits=4, class_predicate=quantization_predicate(q, weights_probe))
    ids = mx.array([[1, 2, 3, 4, 5, 6]])
    expected = np.array(model(ids))
    out = tmp_path / "q"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())), {"format": "mlx"})
    cfg = dict(cfg, quantization=q, quantization_config=q)
    (out / "config.json").write_text(json.dumps(cfg))
    loaded, _ = load_model(out)
    assert loaded.layers[0].mlp.down_proj.bits == 8 and loaded.layers[1].mlp.down_proj.bits == 4
    assert loaded.lm_head.weight.dtype == mx.float32
    np.testing.assert_allclose(np.array(loaded(ids)), expected, atol=1e-5)


# ---- bad input: one clear error naming the file or tensor ----


def test_unknown_model_type(broken):
    edit_config(broken, model_type="llama")
    with pytest.raises(ModelLoadError, match=r"unsupported model_type 'llama'"):
        load_model(broken)


def test_missing_model_type(broken):
    edit_config(broken, model_type=None)
    with pytest.raises(ModelLoadError, match=r"no 'model_type'"):
        load_model(broken)


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"has no config.json"):
        load_model(broken)


def test_missing_shard(tmp_path, moe_ckpt):
    path = tmp_path / "m"
    shutil.copytree(moe_ckpt, path)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=rf"missing shard {victim.name}"):
        load_model(path)


def test_truncated_file(broken):
    f = broken / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model.safetensors is truncated"):
        load_model(broken)


def test_not_safetensors(broken):
    (broken / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    with pytest.raises(ModelLoadError, match=r"model.safetensors is not a safetensors file"):
        load_model(broken)


def _rewrite(path, fn):
    weights = mx.load(str(path / "model.safetensors"))
    fn(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights)


def test_wrong_shape(broken):
    _rewrite(broken, lambda w: w.__setitem__("model.layers.1.mlp.up_proj.weight", mx.zeros((100, 64))))
    with pytest.raises(ModelLoadError, match=r"tensor model.layers.1.mlp.up_proj.weight has shape \(100, 64\), expected \(128, 64\)"):
        load_model(broken)


def test_missing_tensor(broken):
    _rewrite(broken, lambda w: w.pop("model.layers.0.self_attn.k_norm.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor model.layers.0.self_attn.k_norm.weight"):
        load_model(broken)


def test_extra_tensor(broken):
    _rewrite(broken, lambda w: w.__setitem__("model.layers.0.self_attn.global_scale", mx.ones((1,))))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor model.layers.0.self_attn.global_scale"):
        load_model(broken)


def test_missing_expert(tmp_path):
    save_checkpoint(tmp_path, moe_config(num_hidden_layers=1), moe=True)
    _rewrite(tmp_path, lambda w: w.pop("model.layers.0.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor model.layers.0.mlp.experts.5.up_proj.weight"):
        load_model(tmp_path)


def test_no_such_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no such model folder"):
        load_model(tmp_path / "nope")


def test_repo_not_cached_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match=r"Qwen/Qwen3-0.6B is not in the local Hugging Face cache"):
        load_model("Qwen/Qwen3-0.6B")


def test_repo_from_hub_cache(tmp_path, monkeypatch, dense_ckpt):
    """A repo id already in the huggingface_hub cache loads offline (the cache layout is huggingface_hub's own)."""
    cache = tmp_path / "hub"
    snap = cache / "models--Qwen--Tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(dense_ckpt[0], snap)
    (cache / "models--Qwen--Tiny" / "refs").mkdir(parents=True)
    (cache / "models--Qwen--Tiny" / "refs" / "main").write_text("a" * 40)
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    from huggingface_hub import snapshot_download

    assert snapshot_download("Qwen/Tiny", cache_dir=str(cache), local_files_only=True)
    monkeypatch.setattr(
        "huggingface_hub.snapshot_download",
        lambda repo, **kw: snapshot_download(repo, cache_dir=str(cache), **{k: v for k, v in kw.items()}),
    )
    model, tokenizer = load("Qwen/Tiny")
    assert model.args.hidden_size == 64


def test_unsupported_rope_type(broken):
    edit_config(broken, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    with pytest.raises(ModelLoadError, match=r"unsupported rope_scaling type 'linear'"):
        load_model(broken)


def test_config_missing_required_key(broken):
    edit_config(broken, vocab_size=None)
    with pytest.raises(ModelLoadError, match=r"config.json lacks 'vocab_size'"):
        load_model(broken)


def test_malformed_safetensors_header(broken):
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [64]}}).encode()  # no data_offsets
    (broken / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 256)
    with pytest.raises(ModelLoadError, match=r"model.safetensors is not a safetensors file \(malformed header\)"):
        load_model(broken)


def test_transformers_quantized_checkpoint_is_refused(broken):
    edit_config(broken, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128})
    with pytest.raises(ModelLoadError, match=r"quantized as awq, which qwen3-mlx cannot load"):
        load_model(broken)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_checkpoint_keeps_bf16_matmul_weights_on_cpu(tmp_path, tied):
    """On the CPU a bf16 checkpoint's Linear/Embedding weights stay bf16 (our kernels widen them in registers);
    the logits equal those of the float32 upcast (whose parity with transformers test_models checks on a bf16
    checkpoint; transformers itself cannot be the reference here, its bf16 cast also rounds RoPE's frequencies)."""
    from qwen3_mlx import kernels

    if not kernels.active():
        pytest.skip("the CPU kernels are not active here")
    save_checkpoint(tmp_path, dense_config(tie_word_embeddings=tied), torch_dtype="bfloat16")
    ids = np.random.default_rng(0).integers(0, 1000, (1, 30))
    model, _ = load_model(tmp_path)
    layer = model.layers[0]
    assert layer.self_attn.q_proj.weight.dtype == mx.bfloat16
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert layer.input_layernorm.weight.dtype == mx.float32
    mixed = np.array(model(mx.array(ids)))
    assert mixed.dtype == np.float32
    upcast = np.array(load_model(tmp_path, dtype=mx.float32)[0](mx.array(ids)))
    assert np.abs(mixed - upcast).max() <= 1e-5 * np.abs(upcast).max()
    kernels.set_enabled(False)
    try:  # without our kernels nothing stays bf16 on the CPU (MLX emulates bf16 arithmetic there)
        assert load_model(tmp_path)[0].layers[0].self_attn.q_proj.weight.dtype == mx.float32
    finally:
        kernels.set_enabled(True)


def test_bf16_moe_checkpoint_keeps_bf16_expert_stacks_on_cpu(tmp_path):
    """Expert stacks stay bf16 too (our expert gather widens them): same logits as the float32 upcast."""
    from helpers import moe_config

    from qwen3_mlx import kernels

    if not kernels.active():
        pytest.skip("the CPU kernels are not active here")
    save_checkpoint(tmp_path, moe_config(), moe=True, torch_dtype="bfloat16")
    ids = np.random.default_rng(1).integers(0, 1000, (2, 70))  # 140 tokens x 2 experts: many pairs per expert
    model, _ = load_model(tmp_path)
    assert model.layers[0].mlp.switch_mlp.gate_proj.weight.dtype == mx.bfloat16
    mixed = np.array(model(mx.array(ids)))
    upcast = np.array(load_model(tmp_path, dtype=mx.float32)[0](mx.array(ids)))
    assert np.abs(mixed - upcast).max() <= 1e-5 * np.abs(upcast).max()
