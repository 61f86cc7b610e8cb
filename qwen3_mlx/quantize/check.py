"""MLX Swift's loading rules (mlx-swift-lm Qwen3 / Qwen3MoE), checked on an exported folder.

Written from the rules, independently of our own model classes: the config keys Swift decodes, the modules
its Qwen3 / Qwen3MoE classes declare (strict loading: nothing missing, nothing extra), and the rule that a
layer is quantized when its `.scales` tensor exists, with bits / group size taken from the `quantization`
dict alone (the layer's own entry, else the default).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..loader import WEIGHT_INDEX
from .safetensors_io import scan

# Keys Swift's configuration structs decode without a default (missing -> load fails) or with a default
# that differs from Qwen3's real value (missing -> silently wrong), so an export must write them all.
DENSE_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "rope_theta", "rope_scaling",
    "tie_word_embeddings", "max_position_embeddings",
)
MOE_KEYS = (
    "num_experts", "num_experts_per_tok", "decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size",
    "norm_topk_prob",
)
_SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def swift_modules(config: dict) -> dict[str, tuple[int, ...]]:
    """Weight-bearing modules Swift declares -> float weight shape ([E,] out, in) or (n,) for norms."""
    D, V, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    H, KV, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    moe = config["model_type"] == "qwen3_moe"
    mods: dict[str, tuple[int, ...]] = {"model.embed_tokens": (V, D), "model.norm": (D,)}
    for i in range(L):
        p = f"model.layers.{i}"
        mods.update({
            f"{p}.self_attn.q_proj": (H * hd, D), f"{p}.self_attn.k_proj": (KV * hd, D),
            f"{p}.self_attn.v_proj": (KV * hd, D), f"{p}.self_attn.o_proj": (D, H * hd),
            f"{p}.self_attn.q_norm": (hd,), f"{p}.self_attn.k_norm": (hd,),
            f"{p}.input_layernorm": (D,), f"{p}.post_attention_layernorm": (D,),
        })
        sparse = (moe and i not in config["mlp_only_layers"] and config["num_experts"] > 0
                  and (i + 1) % config["decoder_sparse_step"] == 0)
        if sparse:
            E, I = config["num_experts"], config["moe_intermediate_size"]
            mods.update({
                f"{p}.mlp.gate": (E, D), f"{p}.mlp.switch_mlp.gate_proj": (E, I, D),
                f"{p}.mlp.switch_mlp.up_proj": (E, I, D), f"{p}.mlp.switch_mlp.down_proj": (E, D, I),
            })
        else:
            I = config["intermediate_size"]
            mods.update({f"{p}.mlp.gate_proj": (I, D), f"{p}.mlp.up_proj": (I, D), f"{p}.mlp.down_proj": (D, I)})
    if not config["tie_word_embeddings"]:
        mods["lm_head"] = (V, D)
    return mods


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_export(folder: str | Path) -> list[str]:
    """Problems that would stop MLX Swift (or make it load wrongly); an empty list means loadable."""
    folder = Path(folder)
    problems: list[str] = []
    config = _read_json(folder / "config.json", problems)
    if config is None:
        return problems
    mt = config.get("model_type")
    if mt not in ("qwen3", "qwen3_moe"):
        return [f"model_type {mt!r} is not qwen3 / qwen3_moe"]
    for key in DENSE_KEYS + (MOE_KEYS if mt == "qwen3_moe" else ()):
        if key not in config:
            problems.append(f"config.json lacks flat key {key!r}")
    if problems:
        return problems
    if not _is_number(config["rope_theta"]):
        problems.append("rope_theta must be a number")
    if not isinstance(config["tie_word_embeddings"], bool):
        problems.append("tie_word_embeddings must be a boolean")
    rs = config["rope_scaling"]
    if rs is not None and not (isinstance(rs, dict) and all(isinstance(v, str) or _is_number(v) for v in rs.values())):
        problems.append("rope_scaling must be null or a dict of strings/numbers (Swift: [String: StringOrNumber])")

    q = config.get("quantization")
    if q is not None:
        if not isinstance(q, dict):
            return problems + ["quantization must be an object with bits and group_size"]
        if not (isinstance(q.get("bits"), int) and isinstance(q.get("group_size"), int)):
            problems.append("quantization needs integer bits and group_size")
            return problems
        for k, v in q.items():
            if k in ("bits", "group_size", "mode", "quant_method", "linear_class", "quantization_mode"):
                continue
            if v is False:
                continue
            if not (isinstance(v, dict) and isinstance(v.get("bits"), int) and isinstance(v.get("group_size"), int)):
                problems.append(f"quantization[{k!r}] must be false or a dict with bits and group_size")
        if config.get("quantization_config") != q:
            problems.append("quantization_config is not a copy of quantization")

    # Shards and index.
    index_file = folder / WEIGHT_INDEX
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return problems + ["no .safetensors files"]
    for f in files:
        m = _SHARD.match(f.name)
        if f.name == "model.safetensors" and len(files) == 1:
            continue  # mlx-lm's single-file name; Swift loads every *.safetensors
        if not m or int(m.group(2)) != len(files):
            problems.append(f"shard {f.name} is not named model-0000i-of-{len(files):05d}.safetensors")
    try:
        infos = scan(files)
    except Exception as e:  # noqa: BLE001 - any unreadable shard is a problem to report
        return problems + [str(e)]
    index = _read_json(index_file, problems) if index_file.is_file() else None
    if index is not None:
        wm = index.get("weight_map", {})
        if not isinstance(wm, dict):
            problems.append(f"{WEIGHT_INDEX}: weight_map is not an object")
            wm = {}
        if list(wm) != sorted(wm):
            problems.append("index weight_map is not sorted")
        if set(wm) != set(infos) or any(infos[k].file.name != v for k, v in wm.items() if k in infos):
            problems.append("index weight_map does not match the shards' contents")
        meta = index.get("metadata")
        if not isinstance(meta, dict) or meta.get("total_size") != sum(i.nbytes for i in infos.values()):
            problems.append("index metadata.total_size is not the sum of tensor bytes")
    elif not index_file.is_file():
        problems.append(f"no {WEIGHT_INDEX}")

    # Strict module/tensor set, quantization derivable from the dict alone.
    expected: set[str] = set()
    for path, shape in swift_modules(config).items():
        expected.add(f"{path}.weight")
        if len(shape) == 1 or f"{path}.scales" not in infos:
            if f"{path}.weight" in infos and infos[f"{path}.weight"].shape != shape:
                problems.append(f"{path}.weight has shape {infos[f'{path}.weight'].shape}, Swift expects {shape}")
            continue
        expected |= {f"{path}.scales", f"{path}.biases"}
        if q is None:
            problems.append(f"{path} is quantized but config.json has no quantization dict")
            continue
        entry = q.get(path)
        if entry is False:
            problems.append(f"{path} has scales but quantization[{path!r}] is false (Swift would not quantize it)")
            continue
        bits, gs = (entry["bits"], entry["group_size"]) if isinstance(entry, dict) else (q["bits"], q["group_size"])
        out_in = shape[:-1]
        want = {
            "weight": (*out_in, shape[-1] * bits // 32),
            "scales": (*out_in, shape[-1] // gs),
            "biases": (*out_in, shape[-1] // gs),
        }
        for kind, wshape in want.items():
            info = infos.get(f"{path}.{kind}")
            if info is not None and info.shape != wshape:
                problems.append(
                    f"{path}.{kind} has shape {info.shape}; bits {bits} / group {gs} from the quantization dict "
                    f"imply {wshape}"
                )
        w = infos.get(f"{path}.weight")
        if w is not None and w.dtype != "U32":
            problems.append(f"{path}.weight is quantized but stored as {w.dtype}, not U32")
    missing, extra = sorted(expected - set(infos)), sorted(set(infos) - expected)
    problems += [f"missing tensor {n}" for n in missing[:5]]
    problems += [f"extra tensor {n} (Swift loads strictly)" for n in extra[:5]]

    # Tokenizer and templates.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if not (folder / name).is_file():
            problems.append(f"no {name}")
    tc_file = folder / "tokenizer_config.json"
    tc = _read_json(tc_file, problems) if tc_file.is_file() else None
    if tc is not None and not tc.get("chat_template"):
        problems.append("tokenizer_config.json has no inline chat_template")
    return problems


def _read_json(path: Path, problems: list[str]) -> dict | None:
    """The JSON object in `path`, or None after recording why it cannot be used."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name} unreadable: {e}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return data
