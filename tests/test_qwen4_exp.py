"""Qwen3.8-Flash-Next (`qwen4_exp`: hyper-connections, QSA indexed attention, per-layer n-gram embeddings) against
transformers' Qwen4ExpForCausalLM."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from helpers import REAL_VOCAB, copy_tokenizer

EOS = 151645  # <|im_end|>, what the real tokenizer ends a turn with


def q4_config(**overrides) -> dict:
    """Eight layers (two indexed), two streams, PLE on three DeltaNet layers. Eight index heads: a block's score
    is a sum of relu()s, so with few heads whole blocks tie at 0 and torch.topk's choice among ties (not
    documented) would decide the selection."""
    cfg = dict(vocab_size=500, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
               head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
               linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=4096,
               tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
               shared_expert_intermediate_size=48, hc_count=2, hc_lowrank=16, ple_layer_ids=[1, 3, 6],
               ple_embed_dim=32, ngram_size=3, heads_per_ngram=2, ngram_vocab_size_base=300,
               make_ngram_vocab_size_divisible_by=8, split_ngram_parts=4, indexer_n_heads=8, indexer_kv_heads=1,
               indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4, eos_token_id=2,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
               output_gate_type="sigmoid")
    cfg.update(overrides)
    return cfg


def save_q4(path, seed=0, tokenizer=False, **overrides):
    """A random Qwen4ExpForCausalLM written by transformers, weights widened so every part matters (its init
    zeroes the PLE conv)."""
    import torch
    from transformers import Qwen4ExpForCausalLM, Qwen4ExpTextConfig

    torch.manual_seed(seed)
    model = Qwen4ExpForCausalLM(Qwen4ExpTextConfig(**q4_config(**overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # zero-centred norms around 0, the DeltaNet's gated norm around 1
                p.copy_(0.1 * torch.randn_like(p) + (1.0 if "linear_attn.norm" in name else 0.0))
            elif "A_log" in name or "dt_bias" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    if tokenizer:
        copy_tokenizer(path)
    return model


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen4_exp")
    return path, save_q4(path)


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def prompt(n=150, seed=0):
    ids = np.random.RandomState(seed).randint(0, 500, (1, n))
    ids[0, [i for i in (20, 21, 77) if i < n]] = 2  # EOS resets the n-grams
    return ids


def test_logits_match_transformers(q4):
    """A prompt of 37 index blocks (the indexer picks 2 per query) in one forward, then in chunks of 50 / 40 / 7,
    decode steps, and a last chunk on the cache."""
    import torch

    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.cache import make_cache

    path, torch_model = q4
    ids = prompt()
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    model, _ = load_model(path)
    assert rel(model(mx.array(ids)), ref) <= 1e-4
    cache = make_cache(model)
    for a, b in ((0, 50), (50, 90), (90, 97)):
        assert rel(model(mx.array(ids[:, a:b]), cache), ref[:, a:b]) <= 1e-4
    steps = mx.concatenate([model(mx.array(ids[:, t : t + 1]), cache) for t in range(97, 110)], axis=1)
    assert rel(steps, ref[:, 97:110]) <= 1e-4
    assert rel(model(mx.array(ids[:, 110:]), cache), ref[:, 110:]) <= 1e-4


def test_the_indexer_and_the_ngram_resets_matter(q4):
    """The parity above is not blind to the two new mechanisms: attending every key, or n-grams that run across
    an EOS, give other logits."""
    import torch

    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models import qwen4_exp

    path, torch_model = q4
    ids = prompt()
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    model, _ = load_model(path)
    emb = next(layer.ple.ple_embedding for layer in model.layers if "ple" in layer)
    plain = emb.ids(mx.array(ids), mx.full((1, 2), 2, mx.int64))
    ids_no_eos = ids.copy()
    ids_no_eos[0, [20, 21, 77]] = 3
    assert not np.array_equal(np.array(plain), np.array(emb.ids(mx.array(ids_no_eos), mx.full((1, 2), 2, mx.int64))))
    original = qwen4_exp.Indexer.__call__
    try:
        qwen4_exp.Indexer.__call__ = lambda self, x, cache, rope: (original(self, x, cache, rope), None)[1]
        assert rel(model(mx.array(ids)), ref) > 1e-2
    finally:
        qwen4_exp.Indexer.__call__ = original


def test_hash_constants_equal_transformers():
    """Our derivation of the tables' sizes (primes from 20M on) and multipliers for the published settings
    equals transformers' (checkpoints carry them too; load uses theirs)."""
    from transformers.models.qwen4_exp import modeling_qwen4_exp as ref

    from qwen3_mlx.models.qwen4_exp import ModelArgs, hash_constants

    args = ModelArgs.from_dict({**q4_config(vocab_size=248320, ngram_vocab_size_base=20_000_000,
                                            heads_per_ngram=8, ple_embed_dim=64), "model_type": "qwen4_exp_text"})
    for index in (0, 2):
        mults, sizes, _ = hash_constants(args, index)
        assert mults.tolist() == ref._build_layer_multipliers(248320, 3, index, 1234).tolist()
        assert sizes[:3].tolist() == [ref._find_nth_prime_after(20_000_000 - 1, index * 16 + h + 1) for h in range(3)]


def test_checkpoint_hash_constants_are_used(q4, tmp_path):
    """The multipliers a checkpoint carries are the ones hashed with (here: edited ones change the logits)."""
    from safetensors.numpy import load_file, save_file

    from qwen3_mlx.loader import load_model

    path, _ = q4
    for f in ("config.json",):
        (tmp_path / f).write_text((path / f).read_text())
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.0.ple.ple_embedding.layer_multipliers"
    assert tensors[key].dtype == np.int64
    tensors[key] = tensors[key] + 2
    save_file(tensors, tmp_path / "model.safetensors")
    ids = mx.array(prompt(40))
    a, _ = load_model(path)
    b, _ = load_model(tmp_path)
    assert np.array(b.layers[0].ple.ple_embedding.layer_multipliers).tolist() == tensors[key].tolist()
    assert rel(b(ids), a(ids)) > 1e-3


def test_vision_language_layout_loads_the_language_model(q4, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from qwen3_mlx.loader import load_model

    path, _ = q4
    text = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen4_exp", "text_config": text,
                                                      "tie_word_embeddings": False}))
    tensors = {(k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in load_file(path / "model.safetensors").items()}
    tensors["model.visual.patch_embed.proj.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    vl, _ = load_model(tmp_path)
    text_only, _ = load_model(path)
    ids = mx.array(prompt(40))
    assert np.array_equal(np.array(vl(ids)), np.array(text_only(ids)))
    assert "skipping 1 vision" in capsys.readouterr().err


def test_state_checkpoints_cover_the_ngram_and_conv_state(q4):
    """Cut back to a checkpoint, the PLE's n-gram context and conv inputs go back with the DeltaNet's state:
    the logits continue exactly as from a fresh prefill."""
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.cache import make_cache, truncate_cache

    model, _ = load_model(q4[0])
    ids = prompt(80)[0].tolist()
    cache = make_cache(model)
    model.fill(mx.array([ids[:30]]), cache)
    model.fill(mx.array([ids[30:45]]), cache)
    for t in ids[45:50]:
        model(mx.array([[t]]), cache)
    assert truncate_cache(cache, 40) == 30
    got = model(mx.array([ids[30:60]]), cache)
    fresh = make_cache(model)
    model.fill(mx.array([ids[:30]]), fresh)
    assert np.array_equal(np.array(got), np.array(model(mx.array([ids[30:60]]), fresh)))


@pytest.fixture(scope="module")
def q4_real_vocab(tmp_path_factory):
    from qwen3_mlx import load

    path = tmp_path_factory.mktemp("qwen4_exp_vocab")
    torch_model = save_q4(path, tokenizer=True, vocab_size=REAL_VOCAB, eos_token_id=EOS)
    return (*load(path), torch_model)


def test_greedy_generation_matches_transformers(q4_real_vocab):
    import torch

    from qwen3_mlx.generate import generate, prompt_tokens
    from qwen3_mlx.options import GenerationOptions

    model, tokenizer, torch_model = q4_real_vocab
    messages = [{"role": "user", "content": "Write a haiku about the sea, then one about the mountains."}]
    ids = prompt_tokens(tokenizer, messages, GenerationOptions(enable_thinking=False))
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    out = generate(model, tokenizer, ids, temperature=0, max_tokens=16, ignore_eos=True)
    assert out.tokens == ref


def test_chat_turns_resume_from_state_checkpoints(q4_real_vocab):
    """The second and third turns prefill only the new part and give the tokens of a fresh run."""
    from qwen3_mlx.chat import ChatSession
    from qwen3_mlx.generate import generate

    model, tokenizer, _ = q4_real_vocab
    session = ChatSession(model, tokenizer, temperature=0, max_tokens=6, enable_thinking=False)
    for i, question in enumerate(["Hi there", "Tell me more", "Thanks"]):
        tokens = [r.token for r in session.send(question)]
        expected = generate(model, tokenizer, session.conversation()[:-1], temperature=0, max_tokens=6,
                            enable_thinking=False)
        assert tokens == expected.tokens
        stats = session.history[-1]
        assert stats.prefill_tokens + stats.reused_tokens == stats.prompt_tokens
        if i:
            assert stats.reused_tokens >= session.history[i - 1].prompt_tokens - 7 > 0


def test_prompt_cache_file_holds_index_keys_and_ple_state(q4_real_vocab, tmp_path):
    from qwen3_mlx.generate import prompt_tokens
    from qwen3_mlx.models.cache import make_cache
    from qwen3_mlx.prompt_cache import load_prompt_cache, save_prompt_cache

    model, tokenizer, _ = q4_real_vocab
    ids = prompt_tokens(tokenizer, [{"role": "system", "content": "You are a patient tutor. " * 8},
                                    {"role": "user", "content": "Hi"}])
    cache = make_cache(model)
    model.fill(mx.array([ids[:60]]), cache)
    save_prompt_cache(tmp_path / "c.safetensors", model, cache, ids[:60])
    loaded, reused = load_prompt_cache(tmp_path / "c.safetensors", model).take(ids)
    assert reused == 60
    got = model(mx.array([ids[60:]]), loaded)
    fresh = make_cache(model)
    model.fill(mx.array([ids[:60]]), fresh)
    assert np.array_equal(np.array(got), np.array(model(mx.array([ids[60:]]), fresh)))


def test_server_batch_gives_each_sequence_its_own_tokens(q4_real_vocab, monkeypatch):
    """Decoding several sequences at once (the server's batches: one batch through the products and experts,
    attention and n-gram states per sequence) gives each the logits and tokens it gets alone."""
    from qwen3_mlx.generate import generate, prompt_tokens
    from qwen3_mlx.models import qwen3_5_moe
    from qwen3_mlx.models.cache import batch_cache, make_cache

    model, tokenizer, _ = q4_real_vocab
    prompts = [prompt_tokens(tokenizer, [{"role": "user", "content": q}]) for q in ("Hi", "What is the sea?")]
    caches = [make_cache(model) for _ in prompts]
    alone = [make_cache(model) for _ in prompts]
    last = [model(mx.array([p]), c)[0, -1].argmax().item() for p, c in zip(prompts, caches)]
    for p, c in zip(prompts, alone):
        model(mx.array([p]), c)
    batches = []
    moe = qwen3_5_moe.SparseMoeBlock.__call__
    monkeypatch.setattr(qwen3_5_moe.SparseMoeBlock, "__call__",
                        lambda self, x: batches.append(x.shape[0]) or moe(self, x))
    batched = [[t] for t in last]
    for _ in range(4):
        logits = model(mx.array([[t[-1]] for t in batched]), batch_cache(caches))
        for b, (toks, c) in enumerate(zip(batched, alone)):
            assert rel(logits[b], model(mx.array([[toks[-1]]]), c)[0]) <= 1e-5
        for row, toks in zip(np.array(logits[:, -1].argmax(axis=-1)).tolist(), batched):
            toks.append(row)
    assert 2 in batches  # the experts ran the two sequences as one batch
    for p, toks in zip(prompts, batched):
        assert generate(model, tokenizer, p, temperature=0, max_tokens=5, ignore_eos=True).tokens == toks


def test_quantized_kv_cache_is_refused(q4):
    from qwen3_mlx.errors import Qwen3MLXError
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.cache import make_cache

    model, _ = load_model(q4[0])
    with pytest.raises(Qwen3MLXError, match="qwen4_exp"):
        make_cache(model, kv_bits=8)


def test_ngram_tables_stay_on_disk(q4):
    """Loaded, a table is not a parameter (not resident): its rows come from the file, equal to the tensor."""
    from safetensors.numpy import load_file

    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.qwen4_exp import DiskRows

    path, _ = q4
    model, _ = load_model(path)
    emb = model.layers[2].ple.ple_embedding
    assert isinstance(emb.disk, DiskRows) and "ngram_embedding" not in emb
    tensors = load_file(path / "model.safetensors")
    table = np.concatenate([tensors[f"model.layers.2.ple.ple_embedding.ngram_embedding.shard_{j}.weight"]
                            for j in range(4)])
    ids = mx.array([[0, 5, len(table) - 1], [400, 343, 342]])  # 342 / 343: either side of a part boundary
    assert np.array_equal(np.array(emb.disk.take(ids)), table[np.array(ids)])
    with pytest.raises(IndexError):
        emb.disk.take(mx.array([len(table)]))


def test_4bit_export_runs_in_our_runtime(q4, tmp_path):
    """`qwen3-mlx quantize`: the export (marked qwen3-mlx only) keeps the hash constants int64 and the tables
    in float parts read from disk, and runs within the quality report's KL of the source."""
    import subprocess
    import sys

    from safetensors import safe_open

    from qwen3_mlx.loader import load_model

    src, out = q4[0], tmp_path / "q4"
    r = subprocess.run([sys.executable, "-m", "qwen3_mlx", "quantize", str(src), str(out), "--bits", "4",
                        "--group-size", "32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "qwen3-mlx only" in r.stderr
    kl_report = float(r.stdout.split("mean ")[1].split()[0])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen4_exp_text" and "qwen3_mlx_only" in config
    (shard,) = out.glob("*.safetensors")
    with safe_open(shard, "np") as f, safe_open(src / "model.safetensors", "np") as g:
        key = "model.layers.5.ple.ple_embedding.layer_multipliers"
        assert np.array_equal(f.get_tensor(key), g.get_tensor(key)) and f.get_tensor(key).dtype == np.int64
        part = "model.layers.5.ple.ple_embedding.ngram_embedding.shard_1.weight"
        assert np.array_equal(f.get_tensor(part), g.get_tensor(part))
        assert "model.layers.5.ple.key_proj.scales" in f.keys()
    source, _ = load_model(src)
    quantized, _ = load_model(out)
    assert quantized.layers[5].ple.ple_embedding.disk is not None
    ids = mx.array(np.random.default_rng(0).integers(0, 500, (1, 96)))
    x, y = source(ids)[0], quantized(ids)[0]
    p = mx.softmax(x, axis=-1)
    kl = (p * (mx.log(p) - (y - mx.logsumexp(y, axis=-1, keepdims=True)))).sum(axis=-1)
    assert 0 < kl.mean().item() < 0.05
    assert kl.mean().item() == pytest.approx(kl_report, rel=1e-2)


def test_fit_predicts_the_export_and_the_caches(q4, tmp_path):
    """The planner against a real export (weights + the tables' parts on disk) and real caches after a chunked
    prefill and a step (KV and indexer keys, DeltaNet and PLE states with their checkpoints)."""
    from qwen3_mlx.fit import predict
    from qwen3_mlx.generate import prefill_plan
    from qwen3_mlx.loader import load_config, load_model
    from qwen3_mlx.models.cache import make_cache
    from qwen3_mlx.quantize import QuantSpec
    from qwen3_mlx.quantize.hybrid import export_hybrid

    spec = QuantSpec(bits=4, group_size=32)
    export_hybrid(q4[0], tmp_path / "out", spec)
    actual = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    f = predict(load_config(q4[0]), spec=spec, dtype_bytes=4)  # a float32 source
    print(f"FIT qwen4_exp: predicted {f.weight_bytes} + {f.disk_bytes} on disk, actual {actual}")
    assert f.disk_bytes > 0 and abs(f.weight_bytes + f.disk_bytes - actual) / actual < 0.01
    resident = predict(load_config(q4[0]), spec=spec, dtype_bytes=4, tables_resident=True)
    assert resident.disk_bytes == 0 and resident.weight_bytes == pytest.approx(f.weight_bytes + f.disk_bytes, rel=1e-3)

    model, _ = load_model(q4[0])
    prompt, step = 300, 128
    ids = mx.array(np.random.default_rng(0).integers(0, 500, prompt))
    cache = make_cache(model)
    for a, b in prefill_plan(prompt - 1, step):
        model.fill(ids[None, a:b], cache)
        mx.eval([c.state for c in cache])
    for t in (prompt - 1, prompt - 1):  # the prompt's last token, then one generated token
        mx.eval(model(ids[None, t : t + 1], cache))
    fit = predict(load_config(q4[0]), 16, context=prompt, prefill_step=step, dtype_bytes=4)
    assert sum(c.nbytes for c in cache if hasattr(c, "index")) == fit.kv_bytes
    assert sum(c.nbytes for c in cache if not hasattr(c, "index")) == fit.state_bytes


# A Qwen3.8-style template: reasoning_effort (xhigh by default) and preserve_thinking on by default.
QWEN38_TEMPLATE = (
    "{%- set effort = reasoning_effort if reasoning_effort is defined else 'xhigh' %}"
    "{%- set keep = preserve_thinking if preserve_thinking is defined else true %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' and m.reasoning_content and (keep or loop.last) %}"
    "<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\nEffort: {{ effort }}.\n{% endif %}"
)


def test_qwen38_template_variables_reach_this_model(q4_real_vocab, tmp_path):
    """reasoning_effort and preserve_thinking reach a qwen4_exp folder's own template, through load and
    generate, and a chat on it still resumes from its state checkpoints."""
    import shutil

    from qwen3_mlx import load
    from qwen3_mlx.chat import ChatSession
    from qwen3_mlx.generate import generate, prompt_tokens
    from qwen3_mlx.options import GenerationOptions

    folder = q4_real_vocab[1].path
    for f in folder.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN38_TEMPLATE}))
    model, tokenizer = load(tmp_path)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Add."},
                {"role": "user", "content": "And 3+3?"}]
    text = tokenizer.decode(prompt_tokens(tokenizer, messages, GenerationOptions(reasoning_effort="low")))
    assert "Effort: low." in text and "Add." in text  # earlier reasoning kept by default
    dropped = GenerationOptions(chat_template_kwargs={"preserve_thinking": False})
    assert "Add." not in tokenizer.decode(prompt_tokens(tokenizer, messages, dropped))
    out = generate(model, tokenizer, messages, temperature=0, max_tokens=4, reasoning_effort="medium")
    assert len(out.tokens) == 4
    session = ChatSession(model, tokenizer, temperature=0, max_tokens=4, reasoning_effort="low")
    for question in ("Hi", "More"):
        list(session.send(question))
    assert session.history[-1].reused_tokens > 0


def save_q4_with_mtp(path, seed=0):
    """save_q4's checkpoint plus a multi-token-prediction head in the layout llama.cpp's converter reads (see
    `MtpHead`), built from transformers' own modules: the block is layer 0 of a one-layer Qwen4ExpForCausalLM (an
    indexed layer whose budget exceeds every prompt here: dense), the two norms transformers' RMSNorm (the hidden
    one grouped per stream), the projections nn.Linear, the mixer transformers' hyper-connection module. Returns
    (target, a function giving the reference head's streams and logits)."""
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers.models.qwen4_exp import modeling_qwen4_exp as m

    target = save_q4(path, seed=seed)
    cfg = target.config
    one = save_q4(path / "mtp-block", seed=seed + 1, num_hidden_layers=1, layer_types=["indexed_attention"],
                  ple_layer_ids=[], indexer_budget=256)
    H, hc = cfg.hidden_size, cfg.hc_count
    torch.manual_seed(seed + 2)
    head = torch.nn.ModuleDict({
        "pre_fc_norm_embedding": m.Qwen4ExpTextRMSNorm(H, eps=cfg.rms_norm_eps),
        "pre_fc_norm_hidden": m.Qwen4ExpTextRMSNorm(hc * H, group_size=H, eps=cfg.rms_norm_eps),
        "fc_embedding": torch.nn.Linear(H, H, bias=False), "fc_hidden": torch.nn.Linear(H, H, bias=False),
        "hyper_connection_mixer": m.Qwen4ExpTextGatedResidual(cfg, use_combine=False)}).eval()
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    tensors = load_file(path / "model.safetensors")
    tensors.update({"mtp." + k: v.numpy().copy() for k, v in head.state_dict().items()})
    tensors.update({"mtp.layers.0." + k[len("model.layers.0."):]: v
                    for k, v in load_file(path / "mtp-block" / "model.safetensors").items()
                    if k.startswith("model.layers.0.")})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})

    def reference(tokens, hidden):
        """Streams [1, L, hc * H] and logits of the head for the pairs (token i + 1, the target's streams at i)."""
        with torch.no_grad():
            e = head["fc_embedding"](head["pre_fc_norm_embedding"](target.model.embed_tokens(tokens)))
            x = (head["fc_hidden"](head["pre_fc_norm_hidden"](hidden).unflatten(-1, (hc, H))) + e[:, :, None])
            L = tokens.shape[1]
            pe = one.model.rotary_emb(x, torch.arange(L).view(1, 1, -1).expand(3, 1, -1))
            mask = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
            out = one.model.layers[0](x.flatten(-2), position_embeddings=pe, attention_mask=mask)
            return out, target.lm_head(head["hyper_connection_mixer"](out))

    return target, reference


@pytest.fixture(scope="module")
def q4_mtp(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen4_exp-mtp")
    return (path, *save_q4_with_mtp(path))


def target_streams(target, ids: np.ndarray):
    """transformers' streams after the last layer (what the final mixer reads)."""
    import torch

    seen = []
    hook = target.model.layers[-1].register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        target(torch.tensor(ids))
    hook.remove()
    return seen[0]


def test_mtp_head_matches_a_reference_built_from_transformers_modules(q4_mtp):
    """The target's streams (what the head pairs) and the head's logits over a prompt's pairs, then through the
    drafter protocol: the first draft (the prompt's pairs in the head's cache) and the second (the head fed its
    own streams)."""
    import torch

    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.mtp import load_mtp

    path, target, reference = q4_mtp
    ids = prompt(40)
    model, _ = load_model(path)
    drafter = load_mtp(model)
    streams = target_streams(target, ids)
    hidden = model.hidden_states(mx.array(ids))
    assert hidden.shape == (1, 40, 128) and rel(hidden, streams) <= 1e-4
    assert rel(model.logits(hidden), target(torch.tensor(ids)).logits.detach()) <= 1e-4
    out, theirs = reference(torch.tensor(ids[:, 1:]), streams[:, :-1])
    assert rel(drafter.logits(drafter(mx.array(ids[:, 1:]), hidden[:, :-1])), theirs) <= 1e-4

    cache, seen = drafter.make_cache(), []
    drafter.fill(cache, ids[0, :-1].tolist(), model.hidden_states(mx.array(ids[:, :-1]), model.make_cache()))

    def choose(logits):
        seen.append(logits)
        return mx.argmax(logits, axis=-1)

    drafts = drafter.propose(cache, ids[0].tolist(), 0, 2, choose)
    assert rel(seen[0], theirs[:, -1]) <= 1e-4
    chained = torch.tensor(np.concatenate([ids[:, 1:], [[int(drafts[0].item())]]], axis=1))
    _, chain = reference(chained, torch.cat([streams[:, :-1], out[:, -1:]], dim=1))
    assert rel(seen[1], chain[:, -1]) <= 1e-4


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_mtp_gives_plain_greedy_exactly(q4_mtp, k):
    """A prompt past the indexer's budget, in prefill chunks: drafts rejected roll back the DeltaNet, n-gram and
    index states; the tokens are plain greedy decoding's."""
    from qwen3_mlx.generate import generate, stream_generate
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.mtp import load_mtp

    model, _ = load_model(q4_mtp[0])
    drafter = load_mtp(model)
    ids = prompt(60)[0].tolist()
    plain = generate(model, None, ids, max_tokens=30, temperature=0, ignore_eos=True).tokens
    tokens, last = [], None
    for last in stream_generate(model, None, ids, max_tokens=30, temperature=0, ignore_eos=True,
                                draft_model=drafter, num_draft=k, prefill_step_size=16):
        tokens.append(last.token)
    assert tokens == plain
    assert last.draft_tokens > 0


def test_mtp_drafter_folder_drafts_for_a_4bit_export(q4_mtp, tmp_path):
    """`quantize SRC OUT --mtp-drafter D`: the export's shards hold no mtp.* tensor, D the head at 4 bits; greedy
    output with it equals the export's plain greedy output."""
    import subprocess
    import sys

    from safetensors import safe_open

    from qwen3_mlx.generate import generate
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.mtp import load_mtp

    out, head = tmp_path / "q4", tmp_path / "head"
    r = subprocess.run([sys.executable, "-m", "qwen3_mlx", "quantize", str(q4_mtp[0]), str(out), "--bits", "4",
                        "--group-size", "32", "--no-eval", "--mtp-drafter", str(head)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not [k for f in out.glob("*.safetensors") for k in safe_open(str(f), "np").keys() if "mtp." in k]
    with safe_open(str(head / "model.safetensors"), "np") as f:
        assert "mtp.fc_hidden.scales" in f.keys()  # noqa: SIM118
    model, _ = load_model(out)
    drafter = load_mtp(model, head)
    ids = prompt(30)[0].tolist()
    plain = generate(model, None, ids, max_tokens=20, temperature=0, ignore_eos=True).tokens
    out = generate(model, None, ids, max_tokens=20, temperature=0, ignore_eos=True, draft_model=drafter,
                   num_draft=2)
    assert out.tokens == plain
