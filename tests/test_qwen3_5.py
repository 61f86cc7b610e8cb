"""Qwen3.5 / 3.6 and Qwen3-Next (hybrid Gated DeltaNet + gated attention) against transformers."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import REAL_VOCAB, save_hybrid, text_config
from qwen3_mlx.options import GenerationOptions


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_5")
    return path, save_hybrid(path)


@pytest.fixture(scope="module")
def hybrid_next(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_next")
    return path, save_hybrid(path, next_=True)


@pytest.fixture(scope="module")
def hybrid_moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_5_moe")
    return path, save_hybrid(path, moe=True)


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("fixture", ["hybrid", "hybrid_moe", "hybrid_next"])
def test_logits_match_transformers(fixture, request):
    """A prompt longer than one recurrence chunk, then decode steps and a second chunk on the cache."""
    import torch

    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.cache import make_cache

    path, torch_model = request.getfixturevalue(fixture)
    ids = np.random.RandomState(0).randint(0, 500, (1, 150))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    model, _ = load_model(path)
    assert rel(model(mx.array(ids)), ref) <= 1e-4
    cache = make_cache(model)
    model.fill(mx.array(ids[:, :100]), cache)
    steps = mx.concatenate([model(mx.array(ids[:, t : t + 1]), cache) for t in range(100, 110)], axis=1)
    assert rel(steps, ref[:, 100:110]) <= 1e-4
    assert rel(model(mx.array(ids[:, 110:]), cache), ref[:, 110:]) <= 1e-4


def test_vision_language_layout_loads_the_language_model(hybrid, tmp_path, capsys):
    """A Qwen3.5 VL checkpoint: config under text_config, tensors under model.language_model., vision and MTP
    tensors skipped with one line."""
    from safetensors.numpy import load_file, save_file

    from qwen3_mlx.loader import load_model

    path, _ = hybrid
    text = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "text_config": text,
                                                      "tie_word_embeddings": False}))
    tensors = {(k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in load_file(path / "model.safetensors").items()}
    tensors["model.visual.patch_embed.proj.weight"] = np.zeros((4, 4), np.float32)
    tensors["mtp.fc.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    vl, _ = load_model(tmp_path)
    text_only, _ = load_model(path)
    ids = mx.array([[1, 2, 3, 4, 5]])
    assert np.array_equal(np.array(vl(ids)), np.array(text_only(ids)))
    assert "skipping 2 vision / multi-token-prediction tensors" in capsys.readouterr().err


def test_layer_pattern_from_interval():
    from transformers import Qwen3_5TextConfig

    from qwen3_mlx.models.qwen3_5 import ModelArgs

    args = ModelArgs.from_dict({**text_config(num_hidden_layers=8), "model_type": "qwen3_5_text",
                                "full_attention_interval": 4})
    assert args.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"]
    for n, interval in [(8, 4), (7, 3), (6, 2)]:
        ref = Qwen3_5TextConfig(**text_config(num_hidden_layers=n), full_attention_interval=interval).layer_types
        got = ModelArgs.from_dict({**text_config(num_hidden_layers=n), "model_type": "qwen3_5_text",
                                   "full_attention_interval": interval}).layer_types
        assert got == ref


def reference_recurrence(q, k, v, g, beta, state):
    """transformers' token-by-token gated delta rule on our [B, H, L, D] layout (q already scaled by Dk^-0.5,
    which the reference applies itself)."""
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    out, new_state = torch_recurrent_gated_delta_rule(
        t(q * q.shape[-1] ** 0.5).transpose(1, 2), t(k).transpose(1, 2), t(v).transpose(1, 2), t(g).transpose(1, 2),
        t(beta).transpose(1, 2), initial_state=t(state), output_final_state=True, use_qk_l2norm_in_kernel=False)
    return out.transpose(1, 2).numpy(), new_state.numpy()


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 140), chunk=st.sampled_from([16, 32, 64]), heads=st.integers(1, 4),
       seed=st.integers(0, 1000))
def test_chunked_recurrence_equals_step_by_step(length, chunk, heads, seed):
    from qwen3_mlx.kernels.delta_rule import gated_delta_chunked

    rng = np.random.default_rng(seed)
    B, Dk, Dv = 1, 8, 12

    def unit(x):
        return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    q = mx.array(unit(rng.standard_normal((B, heads, length, Dk))) * Dk**-0.5, mx.float32)
    k = mx.array(unit(rng.standard_normal((B, heads, length, Dk))), mx.float32)
    v = mx.array(rng.standard_normal((B, heads, length, Dv)), mx.float32)
    g = mx.array(-np.exp(rng.standard_normal((B, heads, length))) * 0.5, mx.float32)
    beta = mx.array(1 / (1 + np.exp(-rng.standard_normal((B, heads, length)))), mx.float32)
    s0 = mx.array(rng.standard_normal((B, heads, Dk, Dv)) * 0.1, mx.float32)
    want, want_state = reference_recurrence(q, k, v, g, beta, s0)
    got, got_state = gated_delta_chunked(q, k, v, g, beta, s0, chunk=chunk)
    assert rel(got, want) <= 1e-5 and rel(got_state, want_state) <= 1e-5


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 5), length=st.integers(1, 70), dk=st.integers(1, 40),
       dv=st.integers(1, 40), seed=st.integers(0, 1000))
def test_native_recurrence_equals_step_by_step(batch, heads, length, dk, dv, seed):
    """Our CPU primitive over shapes whose head dims are not multiples of the vector width, strided inputs."""
    from qwen3_mlx import kernels
    from qwen3_mlx.kernels import _ext

    if _ext is None:
        pytest.skip("the extension is not built")
    rng = np.random.default_rng(seed)
    f = lambda *shape: mx.array(rng.standard_normal(shape), mx.float32)  # noqa: E731
    q, k = f(batch, length, heads, dk).transpose(0, 2, 1, 3) * 0.3, f(batch, heads, length, dk) * 0.3
    v, state = f(batch, heads, length, dv), f(batch, heads, dk, dv) * 0.1
    g, beta = -mx.exp(f(batch, heads, length)), mx.sigmoid(f(batch, heads, length))
    want, want_state = reference_recurrence(q, k, v, g, beta, state)
    got, got_state = _ext.gated_delta(q, k, v, g, beta, state)
    assert rel(got, want) <= 1e-5 and rel(got_state, want_state) <= 1e-5
    assert kernels.active()


def test_mlx_path_matches_transformers_too(hybrid):
    """With our kernels off (what runs on a GPU): the chunked MLX recurrence for a prompt and its single step
    for decode, the same logits."""
    import torch

    from qwen3_mlx import kernels
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.cache import make_cache

    path, torch_model = hybrid
    ids = np.random.RandomState(1).randint(0, 500, (1, 90))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    kernels.set_enabled(False)
    try:
        model, _ = load_model(path)
        assert rel(model(mx.array(ids)), ref) <= 1e-4
        cache = make_cache(model)
        model.fill(mx.array(ids[:, :86]), cache)
        steps = mx.concatenate([model(mx.array(ids[:, t : t + 1]), cache) for t in range(86, 90)], axis=1)
        assert rel(steps, ref[:, 86:]) <= 1e-4
    finally:
        kernels.set_enabled(True)


def test_greedy_generation_matches_transformers(tmp_path):
    import torch

    from qwen3_mlx import load
    from qwen3_mlx.generate import generate, prompt_tokens

    torch_model = save_hybrid(tmp_path, tokenizer=True, vocab_size=REAL_VOCAB)
    model, tokenizer = load(tmp_path)
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    ids = prompt_tokens(tokenizer, messages, GenerationOptions(enable_thinking=False))
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    out = generate(model, tokenizer, ids, temperature=0, max_tokens=16, ignore_eos=True)
    assert out.tokens == ref


def test_recurrent_state_goes_back_to_checkpoints(hybrid):
    """A state cannot forget tokens: cutting a hybrid cache back lands on the latest checkpoint at or before the
    length asked (the end of a multi-token forward, or the step before the newest), where the logits continue
    exactly as from a fresh prefill."""
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.cache import make_cache, truncate_cache

    model, _ = load_model(hybrid[0])
    ids = list(range(20, 80))
    cache = make_cache(model)
    model.fill(mx.array([ids[:30]]), cache)
    model.fill(mx.array([ids[30:45]]), cache)
    for t in ids[45:50]:
        model(mx.array([[t]]), cache)
    assert truncate_cache(cache, 49) == 49  # the step before the newest
    assert truncate_cache(cache, 47) == 45  # back to the end of the second forward
    assert truncate_cache(cache, 40) == 30 and all(c.offset == 30 for c in cache)
    got = model(mx.array([ids[30:40]]), cache)
    fresh = make_cache(model)
    model.fill(mx.array([ids[:30]]), fresh)
    assert np.array_equal(np.array(got), np.array(model(mx.array([ids[30:40]]), fresh)))
    assert truncate_cache(cache, 10) == 0 and all(c.offset == 0 for c in cache)


def test_unsupported_options_refused(hybrid):
    from qwen3_mlx.errors import Qwen3MLXError
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.cache import make_cache
    from qwen3_mlx.server.engine import PrefixCache

    model, _ = load_model(hybrid[0])
    from qwen3_mlx.prompt_cache import save_prompt_cache
    from qwen3_mlx.quantize import plan_export
    from qwen3_mlx.quantize.recipes import QuantSpec

    with pytest.raises(Qwen3MLXError, match="qwen3_5_text is exported by qwen3_mlx.quantize.hybrid"):
        plan_export(hybrid[0], QuantSpec())
    with pytest.raises(Qwen3MLXError, match="a recurrent state can be saved only where it is"):
        c = make_cache(model)
        model.fill(mx.array([[1, 2, 3]]), c)
        save_prompt_cache(hybrid[0] / "x.safetensors", model, c, [1, 2])
    # The server's prefix cache hands out what a stored hybrid cache can really go back to.
    store = PrefixCache(1 << 30)
    cache = make_cache(model)
    model.fill(mx.array([[1, 2, 3, 4]]), cache)
    model.fill(mx.array([[5, 6]]), cache)
    store.put([1, 2, 3, 4, 5, 6], cache)
    got, held = store.take([1, 2, 3, 4, 5, 9, 9], model)
    assert held == 4 and all(c.offset == 4 for c in got)


def test_moe_fused_expert_layout_loads(hybrid_moe, tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj [E, 2I, D], experts.down_proj) loads as the
    per-expert tensors the hub checkpoints hold."""
    from safetensors.numpy import load_file, save_file

    from qwen3_mlx.loader import load_model

    path, _ = hybrid_moe
    tensors = load_file(path / "model.safetensors")
    for layer in range(4):
        p = f"model.layers.{layer}.mlp.experts"
        gate = [tensors.pop(f"{p}.{e}.gate_proj.weight") for e in range(8)]
        up = [tensors.pop(f"{p}.{e}.up_proj.weight") for e in range(8)]
        tensors[f"{p}.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])
        tensors[f"{p}.down_proj"] = np.stack([tensors.pop(f"{p}.{e}.down_proj.weight") for e in range(8)])
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ids = mx.array([[5, 6, 7, 8, 9, 10]])
    assert np.array_equal(np.array(load_model(tmp_path)[0](ids)), np.array(load_model(path)[0](ids)))


@pytest.fixture(scope="module")
def hybrid_real_vocab(tmp_path_factory):
    from qwen3_mlx import load

    path = tmp_path_factory.mktemp("qwen3_5_vocab")
    save_hybrid(path, tokenizer=True, vocab_size=REAL_VOCAB)
    return load(path)


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_turns_reuse_state_checkpoints(hybrid_real_vocab, thinking):
    """Turn after turn, the chat resumes from a state checkpoint and prefills only the new part of the
    conversation (the template drops earlier thinking), with the tokens of a fresh run."""
    from qwen3_mlx.chat import ChatSession
    from qwen3_mlx.generate import generate

    model, tokenizer = hybrid_real_vocab
    session = ChatSession(model, tokenizer, temperature=0, max_tokens=6, enable_thinking=thinking)
    for i, question in enumerate(["Hi there", "Tell me more", "Thanks"]):
        tokens = [r.token for r in session.send(question)]
        expected = generate(model, tokenizer, session.conversation()[:-1], temperature=0, max_tokens=6,
                            enable_thinking=thinking)
        assert tokens == expected.tokens
        stats = session.history[-1]
        assert stats.prefill_tokens + stats.reused_tokens == stats.prompt_tokens
        if i:  # resumed at the previous prompt's assistant header or later: at most "<|im_start|>assistant\n"
            # and the empty "<think>\n\n</think>\n\n" the template drops are computed again, and the new turn
            assert stats.reused_tokens >= session.history[i - 1].prompt_tokens - 7 > 0


def test_server_prefix_cache_hits_on_a_hybrid(hybrid_real_vocab):
    """The engine serving a hybrid model: a second request with the same system prompt resumes from a state
    checkpoint (cached_tokens > 0), batched with a third, each with the tokens `generate` gives alone."""
    import asyncio

    from qwen3_mlx.generate import generate, prompt_tokens
    from qwen3_mlx.options import GenerationOptions
    from qwen3_mlx.server.engine import Engine, Job

    model, tokenizer = hybrid_real_vocab
    system = {"role": "system", "content": "You are a careful assistant who answers in one short sentence."}
    prompts = [[system, {"role": "user", "content": q}] for q in ("Hi", "What is the sea?", "Name a colour.")]
    options = dict(max_tokens=8, temperature=0, enable_thinking=False)
    expected = [generate(model, tokenizer, p, **options).tokens for p in prompts]

    async def run():
        engine = Engine(model, tokenizer, max_concurrency=4)
        loop = asyncio.get_running_loop()

        async def one(p):
            job = Job(prompt_tokens(tokenizer, p, GenerationOptions(enable_thinking=False)), GenerationOptions(**options), loop)
            engine.submit(job)
            out = []
            while True:
                kind, value = await job.out.get()
                if kind == "done":
                    return out, job.cached_tokens
                assert kind == "token", value
                out.append(value.token)

        try:
            first = await one(prompts[0])
            rest = await asyncio.gather(one(prompts[1]), one(prompts[2]))
            return [first, *rest]
        finally:
            engine.close()

    results = asyncio.run(run())
    assert [tokens for tokens, _ in results] == expected
    assert results[0][1] == 0 and results[1][1] > 0


@pytest.mark.parametrize("budget", [None, 5])
def test_speculative_greedy_equals_plain_on_a_hybrid(hybrid_real_vocab, tmp_path, budget):
    """A hybrid target (its state put back to the round's start checkpoint and the kept drafts fed again) with a
    hybrid draft of other weights: exactly the plain greedy tokens, with and without the thinking budget."""
    from qwen3_mlx import load
    from qwen3_mlx.generate import generate

    model, tokenizer = hybrid_real_vocab
    save_hybrid(tmp_path, seed=3, tokenizer=True, vocab_size=REAL_VOCAB)
    draft, _ = load(tmp_path)
    messages = [{"role": "user", "content": "Count to ten."}]
    options = dict(temperature=0, max_tokens=24, ignore_eos=True, thinking_budget=budget)
    plain = generate(model, tokenizer, messages, **options)
    for k in (1, 3):
        spec = generate(model, tokenizer, messages, draft_model=draft, num_draft=k, **options)
        assert spec.tokens == plain.tokens
    selfdraft = generate(model, tokenizer, messages, draft_model=model, num_draft=3, **options)
    assert selfdraft.tokens == plain.tokens


@pytest.mark.parametrize("kind", [{}, {"moe": True}, {"next_": True}])
def test_quantized_export_runs_in_mlx_lm(tmp_path, kind):
    """`qwen3-mlx quantize` of each hybrid: mlx_lm.load runs the export to our logits; conv, A_log (float32),
    dt_bias and norms stay in float."""
    import subprocess
    import sys

    import mlx_lm
    from safetensors import safe_open

    from qwen3_mlx.loader import load_model

    src, out = tmp_path / "src", tmp_path / "q4"
    save_hybrid(src, tokenizer=True, shared_expert_intermediate_size=64, **kind)
    r = subprocess.run([sys.executable, "-m", "qwen3_mlx", "quantize", str(src), str(out), "--bits", "4",
                        "--group-size", "32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "quality: KL" in r.stdout
    ids = mx.array([[5, 17, 42, 99, 7, 300, 12, 8]])
    ours, _ = load_model(out)
    theirs, _ = mlx_lm.load(str(out))
    assert rel(ours(ids), theirs(ids)) <= 1e-4
    (shard,) = out.glob("*.safetensors")
    with safe_open(shard, "np") as f:
        names = list(f.keys())
        a_log = next(n for n in names if n.endswith("A_log"))
        assert f.get_tensor(a_log).dtype == np.float32
    assert not any(n.endswith(("conv1d.scales", "dt_bias.scales", "norm.scales")) for n in names)


def test_prompt_cache_file_holds_the_recurrent_state(hybrid_real_vocab, tmp_path):
    """`cache-prompt` on a hybrid: the file's KV caches and states continue a prompt as a fresh prefill does."""
    import subprocess
    import sys

    from qwen3_mlx.generate import prompt_tokens
    from qwen3_mlx.models.cache import make_cache
    from qwen3_mlx.prompt_cache import load_prompt_cache

    model, tokenizer = hybrid_real_vocab
    system = "You are a patient tutor. " * 20
    (tmp_path / "system.txt").write_text(system)
    out = tmp_path / "cache.safetensors"
    r = subprocess.run([sys.executable, "-m", "qwen3_mlx", "cache-prompt", str(tokenizer.path), "--prompt-file",
                        str(tmp_path / "system.txt"), "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ids = prompt_tokens(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}])
    cached = load_prompt_cache(out, model)
    cache, reused = cached.take(ids)
    assert reused == len(cached.tokens) > 100
    got = model(mx.array([ids[reused:]]), cache)[0, -1]
    fresh = make_cache(model)
    model.fill(mx.array([ids[:reused]]), fresh)
    want = model(mx.array([ids[reused:]]), fresh)[0, -1]
    assert rel(got, want) <= 1e-5


def test_quantized_kv_cache_on_the_attention_layers(hybrid):
    """--kv-bits quantizes a hybrid's attention layers only (the states stay float32), from the start or after
    `quantized_kv_start` positions, with logits close to the float cache's; trimming back still works."""
    from qwen3_mlx.generate import generate
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.cache import QuantizedKVCache, RecurrentCache, make_cache, quantize_cache, truncate_cache

    model, _ = load_model(hybrid[0])
    ids = mx.array([list(range(30, 90))])
    float_cache, q_cache = make_cache(model), make_cache(model, kv_bits=8, kv_group_size=32)
    assert {type(c) for c in q_cache} == {RecurrentCache, QuantizedKVCache}
    model.fill(ids[:, :50], float_cache)
    model.fill(ids[:, :50], q_cache)
    want, got = model(ids[:, 50:], float_cache), model(ids[:, 50:], q_cache)
    assert rel(got, want) <= 0.05
    assert truncate_cache(q_cache, 50) == 50
    late = make_cache(model)
    model.fill(ids[:, :20], late)
    quantize_cache(late, bits=8, group_size=32, start=16)
    assert isinstance(late[3], QuantizedKVCache) and late[3].offset == 20 and isinstance(late[0], RecurrentCache)
    out = generate(model, None, list(range(30, 60)), kv_bits=8, kv_group_size=32, quantized_kv_start=16,
                   temperature=0, max_tokens=6, ignore_eos=True)
    assert len(out.tokens) == 6


@pytest.mark.parametrize("kind", [{}, {"moe": True}, {"next_": True}], ids=["dense", "moe", "next"])
def test_fit_predicts_the_hybrid_export_bytes(tmp_path, kind):
    """The planner's weight bytes (tensors read off the architecture) against the export's file size."""
    from qwen3_mlx.fit import predict
    from qwen3_mlx.loader import load_config
    from qwen3_mlx.quantize import QuantSpec
    from qwen3_mlx.quantize.hybrid import export_hybrid

    save_hybrid(tmp_path / "src", hidden_size=128, intermediate_size=256, shared_expert_intermediate_size=64, **kind)
    spec = QuantSpec(bits=4, group_size=32)
    export_hybrid(tmp_path / "src", tmp_path / "out", spec)
    actual = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    predicted = predict(load_config(tmp_path / "src"), spec=spec, dtype_bytes=4).weight_bytes  # a float32 source
    print(f"FIT hybrid {kind}: predicted {predicted} actual {actual} ({(predicted - actual) / actual:+.2%})")
    assert abs(predicted - actual) / actual < 0.01


def test_fit_counts_kv_on_attention_layers_and_states_with_checkpoints():
    """KV bytes per position only for the full-attention layers, and the linear layers' states with their
    checkpoints, against the caches of a real prefill run as generate runs it (chunks, then single steps)."""
    from qwen3_mlx.fit import kv_bytes_per_token, predict, state_bytes_per_layer, state_copies
    from qwen3_mlx.generate import prefill_plan
    from qwen3_mlx.models import make_cache
    from qwen3_mlx.models.cache import KVCache, RecurrentCache
    from qwen3_mlx.models.registry import random_model

    cfg = {**text_config(num_hidden_layers=8), "model_type": "qwen3_5_text"}
    model = random_model(cfg, mx.float32)
    prompt, step = 700, 128
    cache = make_cache(model)
    ids = mx.array(np.random.default_rng(0).integers(0, 500, prompt), dtype=mx.int32)
    for a, b in prefill_plan(prompt - 1, step):
        model.fill(ids[None, a:b], cache)
        mx.eval([c.state for c in cache])
    for t in (prompt - 1, prompt - 1):  # the prompt's last token, then one generated token
        mx.eval(model(ids[None, t : t + 1], cache))
    kv = [c for c in cache if isinstance(c, KVCache)]
    states = [c for c in cache if isinstance(c, RecurrentCache)]
    assert len(kv) == 2 and len(states) == 6
    allocated = sum(c.keys.nbytes + c.values.nbytes for c in kv)
    assert allocated == kv_bytes_per_token(cfg, 4) * 768  # 701 positions, in steps of 256
    assert states[0].conv.nbytes + states[0].recurrent.nbytes == state_bytes_per_layer(cfg, 4)
    copies = state_copies(prompt, step)
    assert copies == 2 + 6  # ceil(699 / 128) chunk checkpoints, the state before the step and the live one
    assert sum(c.nbytes for c in states) == 6 * state_bytes_per_layer(cfg, 4) * copies
    f = predict(cfg, 16, context=prompt, prefill_step=step, dtype_bytes=4)
    assert f.state_bytes == 6 * state_bytes_per_layer(cfg, 4) * copies
    assert f.kv_bytes == allocated


def test_hybrid_export_and_its_quality_report_run_in_bounded_memory(tmp_path):
    """A 16-layer MoE hybrid (float32 source): the export and the layer-by-layer quality report each peak at a
    fraction of the source (the earlier in-memory export held the whole float model), in several shards that
    mlx-lm loads to our logits; the report equals KL and top-1 computed from both whole models' logits."""
    import mlx_lm

    from qwen3_mlx.loader import load_model
    from qwen3_mlx.quantize import QuantSpec, quality_report
    from qwen3_mlx.quantize.hybrid import export_hybrid
    from qwen3_mlx.quantize.quality import DEFAULT_TEXT, report_tokens

    src, out = tmp_path / "src", tmp_path / "out"
    save_hybrid(src, moe=True, num_hidden_layers=16, hidden_size=256, moe_intermediate_size=256,
                shared_expert_intermediate_size=256, num_experts=16)
    source = sum(f.stat().st_size for f in src.glob("*.safetensors"))

    def peak_of(fn):  # above what other tests' live arrays already hold
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        result = fn()
        return result, mx.get_peak_memory() - base

    _, export_peak = peak_of(lambda: export_hybrid(src, out, QuantSpec(bits=4, group_size=64), max_shard_size="8MB"))
    report, quality_peak = peak_of(lambda: quality_report(src, out))
    print(f"source {source / 1e6:.1f} MB: export peak {export_peak / 1e6:.1f} MB, quality peak {quality_peak / 1e6:.1f} MB,"
          f" {report}")
    assert export_peak < 0.25 * source and quality_peak < 0.25 * source
    assert len(list(out.glob("*.safetensors"))) > 2

    ids = mx.array(report_tokens(out, 500, DEFAULT_TEXT, 96))[None]
    ref, quant = (np.array(load_model(p)[0](ids)[0].astype(mx.float32), dtype=np.float64) for p in (src, out))
    logp, logq = (x - x.max(-1, keepdims=True) for x in (ref, quant))
    logp, logq = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (logp, logq))
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    assert report.tokens == ids.shape[1]
    assert abs(report.kl_mean - kl.mean()) <= 1e-3 * kl.mean() and abs(report.kl_max - kl.max()) <= 1e-3 * kl.max()
    assert report.top1_agreement == np.mean(ref.argmax(-1) == quant.argmax(-1))
    ids = mx.array([[5, 17, 42, 99, 7, 300, 12, 8]])
    theirs, _ = mlx_lm.load(str(out))
    assert rel(load_model(out)[0](ids), theirs(ids)) <= 1e-4
