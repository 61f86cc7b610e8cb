"""MTP self-speculation (`models/mtp.py`): the head of tiny Qwen3.5 / Qwen3.5-MoE / Qwen3-Next checkpoints
written with real-shaped `mtp.*` tensors in Qwen's layout, against transformers' own MTP layer (`MtpLayer` over
the model's decoder block and norm); greedy drafting gives plain greedy output token for token."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from helpers import REAL_VOCAB, save_hybrid

from qwen3_mlx.errors import Qwen3MLXError
from qwen3_mlx.generate import generate, stream_generate

# transformers' MtpModel names <- Qwen's checkpoint names (conversion_mapping.py, "MtpModel")
HEAD = {"eh_proj.weight": "mtp.fc.weight", "enorm.weight": "mtp.pre_fc_norm_embedding.weight",
        "hnorm.weight": "mtp.pre_fc_norm_hidden.weight", "post_norm.weight": "mtp.norm.weight"}


def save_with_mtp(path, seed: int = 0, **kw):
    """`save_hybrid`'s checkpoint plus an MTP head: the block is layer 0 of a one-layer model of the same class
    (full attention), written by transformers, renamed to mtp.layers.0.*; fc and the three norms random. Returns
    (target torch model, transformers' MtpLayer holding the same head)."""
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers.modeling_layers import MtpLayer

    target = save_hybrid(path, seed=seed, **kw)
    block_dir = path / "mtp-block"
    one = save_hybrid(block_dir, seed=seed + 1, num_hidden_layers=1, layer_types=["full_attention"],
                      **{k: v for k, v in kw.items() if k in ("moe", "next_")})
    tensors = load_file(path / "model.safetensors")
    for name, value in load_file(block_dir / "model.safetensors").items():
        if name.startswith("model.layers.0."):
            tensors["mtp.layers.0." + name[len("model.layers.0."):]] = value
    ref = MtpLayer(one.config, type(one.model.layers[0]), type(one.model.norm), 0).eval()
    ref.mtp_block = one.model.layers[0]
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, theirs in HEAD.items():
            p = ref.get_parameter(name)
            p.copy_(0.1 * torch.randn(p.shape, generator=g) if "norm" in name else
                    0.08 * torch.randn(p.shape, generator=g))
            tensors[theirs] = p.numpy().copy()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return target, ref


KINDS = {"dense": {}, "moe": {"moe": True}, "next": {"next_": True}}


@pytest.fixture(scope="module", params=list(KINDS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"mtp-{request.param}")
    target, ref = save_with_mtp(path, **KINDS[request.param])
    return path, target, ref


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A dense one with the real vocabulary and tokenizer (chat, CLI)."""
    path = tmp_path_factory.mktemp("mtp-tokenizer")
    save_with_mtp(path, tokenizer=True, vocab_size=REAL_VOCAB)
    return path


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def reference_steps(target, ref, ids: np.ndarray, chained: int):
    """transformers: the head's logits for the pairs (token i + 1, final hidden state i) of `ids`, then for
    one drafted step fed its own output (the drafted token `chained` after the last token)."""
    import torch

    def run(tokens, hidden):
        L = tokens.shape[1]
        pos = torch.arange(1, L + 1)[None]  # the positions of the tokens the pairs embed
        emb = target.model.embed_tokens(tokens)
        mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
        out = ref(emb, hidden, target.model.rotary_emb(emb, pos), mask, pos, None)
        return out, target.lm_head(out)

    with torch.no_grad():
        t = torch.tensor(ids)
        h = target(t, output_hidden_states=True).hidden_states[-1]  # after the final norm
        out, logits = run(t[:, 1:], h[:, :-1])
        _, chain = run(torch.cat([t[:, 1:], torch.tensor([[chained]])], 1), torch.cat([h[:, :-1], out[:, -1:]], 1))
    return logits.numpy(), chain[:, -1].numpy()


def test_draft_logits_match_transformers(checkpoint):
    """Our head over a prompt's pairs (one forward), and a draft step through the drafter protocol: the logits
    of the first draft (after the prompt's pairs went into the head's cache in a prefill) and of the second
    (the head fed its own output) equal transformers' MtpLayer."""
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.mtp import load_mtp

    path, target, ref = checkpoint
    ids = np.random.RandomState(0).randint(0, 500, (1, 40))
    model, _ = load_model(path)
    drafter = load_mtp(model)
    hidden = model.hidden_states(mx.array(ids))
    ours = model.logits(drafter(mx.array(ids[:, 1:]), hidden[:, :-1]))
    theirs, _ = reference_steps(target, ref, ids, 0)
    assert rel(ours, theirs) <= 1e-4

    cache, seen = drafter.make_cache(), []
    drafter.fill(cache, ids[0, :-1].tolist(), model.hidden_states(mx.array(ids[:, :-1]), model.make_cache()))

    def choose(logits):
        seen.append(logits)
        return mx.argmax(logits, axis=-1)

    drafts = drafter.propose(cache, ids[0].tolist(), 0, 2, choose)
    assert rel(seen[0], theirs[:, -1]) <= 1e-4
    _, chain = reference_steps(target, ref, ids, int(drafts[0].item()))
    assert rel(seen[1], chain) <= 1e-4


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_mtp_gives_plain_greedy_exactly(checkpoint, k):
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.mtp import load_mtp

    path, _, _ = checkpoint
    model, _ = load_model(path)
    drafter = load_mtp(model)
    prompt = [int(t) for t in np.random.RandomState(1).randint(0, 500, size=30)]
    plain = generate(model, None, prompt, max_tokens=40, temperature=0, ignore_eos=True).tokens
    tokens, last = [], None
    for last in stream_generate(model, None, prompt, max_tokens=40, temperature=0, ignore_eos=True,
                                draft_model=drafter, num_draft=k, prefill_step_size=8):
        tokens.append(last.token)
    assert tokens == plain
    assert last.draft_tokens > 0


def test_a_head_that_often_agrees_keeps_drafts_and_stays_exact(tmp_path):
    """A target whose next token depends on the current one only (every block's output projection zeroed: the
    residual stream is the token's embedding) and a head that nearly knows it (block outputs zeroed, fc passing
    the embedding through plus a little of the hidden state, its final norm the target's): some drafts are kept,
    some not, which exercises the multi-position pairing after a round; the output stays plain greedy's."""
    from safetensors.numpy import load_file, save_file

    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.mtp import load_mtp

    save_with_mtp(tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    for name in t:
        if name.startswith(("model.layers.", "mtp.layers.")) and name.endswith(
                ("out_proj.weight", "o_proj.weight", "down_proj.weight")):
            t[name] = np.zeros_like(t[name])
    H = t["mtp.fc.weight"].shape[0]
    noise = 0.15 * np.random.RandomState(0).randn(H, H) / np.sqrt(H)
    t["mtp.fc.weight"] = np.concatenate([np.eye(H), noise], axis=1).astype(np.float32)
    t["mtp.pre_fc_norm_embedding.weight"] = np.zeros((H,), np.float32)  # zero-centred: a weight of 1
    t["mtp.norm.weight"] = t["model.norm.weight"]
    save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(tmp_path)
    drafter = load_mtp(model)
    prompt = [int(x) for x in np.random.RandomState(3).randint(0, 500, size=12)]
    plain = generate(model, None, prompt, max_tokens=60, temperature=0, ignore_eos=True).tokens
    tokens, last = [], None
    for last in stream_generate(model, None, prompt, max_tokens=60, temperature=0, ignore_eos=True,
                                draft_model=drafter, num_draft=4):
        tokens.append(last.token)
    assert tokens == plain
    assert 0 < last.accepted_tokens < last.draft_tokens


def test_sampling_with_mtp_runs_the_rejection_scheme(checkpoint):
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.mtp import load_mtp

    path, _, _ = checkpoint
    model, _ = load_model(path)
    drafter = load_mtp(model)
    opts = {"max_tokens": 24, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": 7, "ignore_eos": True,
            "draft_model": drafter, "num_draft": 3}
    a = generate(model, None, [1, 2, 3, 4, 5], **opts)
    b = generate(model, None, [1, 2, 3, 4, 5], **opts)
    assert len(a.tokens) == 24 and a.tokens == b.tokens  # the seed's random stream drives drafts and checks


def test_chat_with_mtp_reuses_its_state_and_answers_as_without(with_tokenizer):
    from qwen3_mlx.chat import ChatSession
    from qwen3_mlx.loader import load
    from qwen3_mlx.models.mtp import load_mtp

    model, tokenizer = load(with_tokenizer)
    replies = {}
    for mtp in (False, True):
        opts = {"draft_model": load_mtp(model), "num_draft": 3} if mtp else {}
        session = ChatSession(model, tokenizer, enable_thinking=False, max_tokens=10, temperature=0, **opts)
        replies[mtp] = ["".join(r.text for r in session.send(t)) for t in ("Hi", "More", "And again")]
        assert session.history[1].reused_tokens > 0 and session.history[2].reused_tokens > 0
    assert replies[True] == replies[False]


def test_greedy_mtp_with_a_thinking_budget(with_tokenizer):
    """The budget's stop text cuts a round short; the target goes back and feeds it, and the drafter follows."""
    from qwen3_mlx.loader import load
    from qwen3_mlx.models.mtp import load_mtp

    model, tokenizer = load(with_tokenizer)
    drafter = load_mtp(model)
    prompt = "<|im_start|>user\nThink.<|im_end|>\n<|im_start|>assistant\n<think>\n"  # reasoning already open
    for budget in (0, 3, 7):
        opts = {"max_tokens": 40, "temperature": 0, "thinking_budget": budget}
        plain = generate(model, tokenizer, prompt, **opts)
        assert generate(model, tokenizer, prompt, draft_model=drafter, num_draft=4, **opts).tokens == plain.tokens


def run_cli(*args):
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "qwen3_mlx", "generate", *map(str, args)], check=False,
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_draft_model_mtp_prints_plain_greedy_output(with_tokenizer):
    args = (with_tokenizer, "--prompt", "Hello there", "--no-think", "--temperature", "0", "--max-tokens", "16")
    plain = run_cli(*args)
    spec = run_cli(*args, "--draft-model", "mtp", "--num-draft", "3")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "draft kept" in spec.stderr


def test_a_checkpoint_without_mtp_tensors_is_refused_in_one_line(tmp_path):
    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.mtp import load_mtp

    save_hybrid(tmp_path, tokenizer=True, vocab_size=REAL_VOCAB)
    model, _ = load_model(tmp_path)
    with pytest.raises(Qwen3MLXError, match=r"no multi-token-prediction head \(no mtp\.\* tensors\)"):
        load_mtp(model)
    proc = run_cli(tmp_path, "--prompt", "Hi", "--max-tokens", "2", "--draft-model", "mtp")
    assert proc.returncode != 0
    assert "no mtp.* tensors" in proc.stderr and "Traceback" not in proc.stderr


def test_export_leaves_the_head_out_and_writes_it_as_a_drafter_folder(tmp_path):
    """`quantize SRC OUT --mtp-drafter D`: OUT's shards hold no mtp.* tensor (MLX Swift's rule, checked), D holds
    the head at 4 bits, and the 4-bit export drafted by it gives the export's plain greedy output."""
    from safetensors import safe_open

    from qwen3_mlx.loader import load_model
    from qwen3_mlx.models.mtp import load_mtp
    from qwen3_mlx.quantize import check_export

    src, out, head = tmp_path / "src", tmp_path / "out", tmp_path / "head"
    save_with_mtp(src)
    env = dict(os.environ, NO_COLOR="1")
    proc = subprocess.run([sys.executable, "-m", "qwen3_mlx", "quantize", str(src), str(out), "--no-eval",
                           "--mtp-drafter", str(head)], check=False, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = [k for f in out.glob("*.safetensors") for k in safe_open(str(f), "np").keys()]  # noqa: SIM118
    assert names and not [k for k in names if "mtp." in k]
    assert not [p for p in check_export(out) if "mtp" in p]
    with safe_open(str(head / "model.safetensors"), "np") as f:
        assert "mtp.fc.scales" in f.keys() and all(k.startswith("mtp.") for k in f.keys())  # noqa: SIM118
    model, _ = load_model(out)
    drafter = load_mtp(model, head)
    prompt = [int(t) for t in np.random.RandomState(4).randint(0, 500, size=20)]
    plain = generate(model, None, prompt, max_tokens=30, temperature=0, ignore_eos=True)
    assert generate(model, None, prompt, max_tokens=30, temperature=0, ignore_eos=True, draft_model=drafter,
                    num_draft=3).tokens == plain.tokens
    with pytest.raises(Qwen3MLXError, match="no mtp"):
        load_mtp(model)  # the export itself carries no head
