"""MLX Swift's loading rules (mlx-swift-lm Qwen3, Qwen3MoE, Qwen3Next, Qwen35 / Qwen35MoE), checked on an exported
folder.

Written from the rules, independently of our own model classes: the config keys Swift decodes, the modules
its classes declare (strict loading: nothing missing, nothing extra; the hybrids' layer kinds from
`full_attention_interval` alone), the rule that a layer is quantized when its `.scales` tensor exists, with bits
/ group size taken from the `quantization` dict alone (the layer's own entry, else the default), and what
Qwen3.5's `sanitize` does to tensors it takes for Hugging Face's (adds 1 to every norm).
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
# The hybrids' text config: Swift's defaults for these are another model's (hidden 4096, tie false, Qwen3-Next's
# partial rotary 1.0 and norm_topk_prob false). full_attention_interval defaults to 4 in Swift and mlx-lm alike.
HYBRID_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "vocab_size", "rope_theta", "partial_rotary_factor", "tie_word_embeddings", "max_position_embeddings",
    "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "linear_conv_kernel_dim",
)
HYBRID_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
NEXT_KEYS = ("intermediate_size", "decoder_sparse_step", "norm_topk_prob")
# Swift model types whose tensors sit under `language_model.` (its Qwen35Model / Qwen35MoEModel)
VL_TYPES = ("qwen3_5", "qwen3_5_moe")
QWEN3_5_TYPES = (*VL_TYPES, "qwen3_5_text")  # Swift's Qwen35TextModel.sanitize
HYBRID_TYPES = (*QWEN3_5_TYPES, "qwen3_next")
BARE = ("A_log", "dt_bias")  # parameters of the DeltaNet module itself, not of a child module's `.weight`
_SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def swift_modules(config: dict) -> dict[str, tuple[int, ...]]:
    """Weight-bearing modules Swift declares -> float weight shape ([E,] out, in) or (n,) for norms; for the
    DeltaNet's bare parameters (`BARE`), their own name."""
    if config["model_type"] in HYBRID_TYPES:
        return _hybrid_modules(config)
    D, V, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    moe = config["model_type"] == "qwen3_moe"
    mods: dict[str, tuple[int, ...]] = {"model.embed_tokens": (V, D), "model.norm": (D,)}
    for i in range(L):
        p = f"model.layers.{i}"
        mods.update(_attention(f"{p}.self_attn", config, gated=False))
        mods.update({f"{p}.input_layernorm": (D,), f"{p}.post_attention_layernorm": (D,)})
        sparse = (moe and i not in config["mlp_only_layers"] and config["num_experts"] > 0
                  and (i + 1) % config["decoder_sparse_step"] == 0)
        mods.update(_experts(f"{p}.mlp", config) if sparse else _mlp(f"{p}.mlp", D, config["intermediate_size"]))
    if not config["tie_word_embeddings"]:
        mods["lm_head"] = (V, D)
    return mods


def _hybrid_modules(config: dict) -> dict[str, tuple[int, ...]]:
    """Qwen35 / Qwen35MoE / Qwen3Next: layer i is linear attention unless (i + 1) % full_attention_interval is 0."""
    c = _text(config)
    D, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    nxt, E = config["model_type"] == "qwen3_next", c.get("num_experts", 0)
    mods: dict[str, tuple[int, ...]] = {"model.embed_tokens": (V, D), "model.norm": (D,)}
    for i in range(L):
        p = f"model.layers.{i}"
        linear = (i + 1) % c.get("full_attention_interval", 4) != 0
        mods.update(_delta_net(f"{p}.linear_attn", c, nxt) if linear else _attention(f"{p}.self_attn", c, gated=True))
        mods.update({f"{p}.input_layernorm": (D,), f"{p}.post_attention_layernorm": (D,)})
        sparse = E > 0 and not (nxt and (i in c.get("mlp_only_layers", []) or (i + 1) % c["decoder_sparse_step"]))
        if sparse:
            mods.update({**_experts(f"{p}.mlp", c), f"{p}.mlp.shared_expert_gate": (1, D),
                         **_mlp(f"{p}.mlp.shared_expert", D, c["shared_expert_intermediate_size"])})
        else:
            mods.update(_mlp(f"{p}.mlp", D, c["intermediate_size"]))
    if not c["tie_word_embeddings"]:
        mods["lm_head"] = (V, D)
    prefix = "language_model." if config["model_type"] in VL_TYPES else ""
    return {prefix + k: v for k, v in mods.items()}


def _attention(p: str, c: dict, gated: bool) -> dict[str, tuple[int, ...]]:
    """Qwen3's attention; `gated`: the hybrids', whose q_proj also gives the output gate."""
    D, H, KV = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or D // H
    return {f"{p}.q_proj": ((2 if gated else 1) * H * hd, D), f"{p}.k_proj": (KV * hd, D),
            f"{p}.v_proj": (KV * hd, D), f"{p}.o_proj": (D, H * hd), f"{p}.q_norm": (hd,), f"{p}.k_norm": (hd,)}


def _delta_net(p: str, c: dict, fused: bool) -> dict[str, tuple[int, ...]]:
    """The Gated DeltaNet; `fused`: Qwen3-Next's in_proj_qkvz / in_proj_ba."""
    D, hk, hv = c["hidden_size"], c["linear_num_key_heads"], c["linear_num_value_heads"]
    keys, values = hk * c["linear_key_head_dim"], hv * c["linear_value_head_dim"]
    mods = {f"{p}.conv1d": (2 * keys + values, c["linear_conv_kernel_dim"], 1), f"{p}.dt_bias": (hv,),
            f"{p}.A_log": (hv,), f"{p}.norm": (c["linear_value_head_dim"],), f"{p}.out_proj": (D, values)}
    if fused:
        return {**mods, f"{p}.in_proj_qkvz": (2 * keys + 2 * values, D), f"{p}.in_proj_ba": (2 * hv, D)}
    return {**mods, f"{p}.in_proj_qkv": (2 * keys + values, D), f"{p}.in_proj_z": (values, D),
            f"{p}.in_proj_b": (hv, D), f"{p}.in_proj_a": (hv, D)}


def _mlp(p: str, D: int, I: int) -> dict[str, tuple[int, ...]]:
    return {f"{p}.gate_proj": (I, D), f"{p}.up_proj": (I, D), f"{p}.down_proj": (D, I)}


def _experts(p: str, c: dict) -> dict[str, tuple[int, ...]]:
    D, E, I = c["hidden_size"], c["num_experts"], c["moe_intermediate_size"]
    return {f"{p}.gate": (E, D), f"{p}.switch_mlp.gate_proj": (E, I, D), f"{p}.switch_mlp.up_proj": (E, I, D),
            f"{p}.switch_mlp.down_proj": (E, D, I)}


def _text(config: dict) -> dict:
    """The language model's config: `text_config` of a vision-language layout (what Swift decodes), else all."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _has_bits(d: dict) -> bool:
    return isinstance(d.get("bits"), int) and isinstance(d.get("group_size"), int)


class _Unloadable(Exception):
    """Findings after which later checks would only report their consequences."""


def check_export(folder: str | Path) -> list[str]:
    """Problems that would stop MLX Swift (or make it load wrongly); an empty list means loadable."""
    folder = Path(folder)
    problems: list[str] = []
    try:  # one statement per check that may stop, so findings before it are kept
        config = _check_config(folder)
        problems += _check_value_types(_text(config)) + _check_layer_kinds(config)
        problems += _check_quantization(config)
        files = sorted(folder.glob("*.safetensors"))
        problems += _check_shard_names(files)
        infos = _scan_shards(files)
        problems += _check_index(folder, infos) + _check_tensors(config, infos) + _check_norm_shift(config, infos)
        problems += _check_tokenizer(folder)
    except _Unloadable as stop:
        problems += stop.args
    return problems


def _check_config(folder: Path) -> dict:
    """config.json, once it has every flat key later checks (and Swift) read."""
    found: list[str] = []
    config = _read_json(folder / "config.json", found)
    if config is None:
        raise _Unloadable(*found)
    mt = config.get("model_type")
    if mt not in ("qwen3", "qwen3_moe", *HYBRID_TYPES):
        raise _Unloadable(f"model_type {mt!r} is not one of Swift's qwen3, qwen3_moe, {', '.join(HYBRID_TYPES)}")
    if mt in VL_TYPES and not isinstance(config.get("text_config"), dict):
        raise _Unloadable(f"model_type {mt} needs a text_config object (Swift's Qwen35Model decodes it)")
    text = _text(config)
    moe = text.get("num_experts", 0) > 0
    keys = {"qwen3": DENSE_KEYS, "qwen3_moe": DENSE_KEYS + MOE_KEYS, "qwen3_next": HYBRID_KEYS + HYBRID_MOE_KEYS
            + NEXT_KEYS}.get(mt, HYBRID_KEYS + (HYBRID_MOE_KEYS if moe else ("intermediate_size",)))
    where = "text_config" if text is not config else "config.json"
    if missing := [f"{where} lacks flat key {k!r}" for k in keys if k not in text]:
        raise _Unloadable(*missing)
    return config


def _check_value_types(config: dict) -> list[str]:
    """Swift decodes these into typed fields: a value of another JSON type fails the decode."""
    found = []
    if not _is_number(config["rope_theta"]):
        found.append("rope_theta must be a number")
    if not isinstance(config["tie_word_embeddings"], bool):
        found.append("tie_word_embeddings must be a boolean")
    rs = config.get("rope_scaling")
    if rs is not None and not (isinstance(rs, dict) and all(isinstance(v, str) or _is_number(v) for v in rs.values())):
        found.append("rope_scaling must be null or a dict of strings/numbers (Swift: [String: StringOrNumber])")
    return found


def _check_layer_kinds(config: dict) -> list[str]:
    """Swift and mlx-lm build a hybrid's layer kinds from full_attention_interval alone; layer_types must agree."""
    text = _text(config)
    kinds, n = text.get("layer_types"), text.get("full_attention_interval", 4)
    if config["model_type"] not in HYBRID_TYPES or not kinds:
        return []
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return ["full_attention_interval must be a positive integer"]
    built = ["linear_attention" if (i + 1) % n else "full_attention" for i in range(len(kinds))]
    if kinds == built:
        return []
    return [f"layer_types differ from the layer kinds full_attention_interval {n} builds in Swift and mlx-lm "
            f"(full attention at layers {[i for i, t in enumerate(kinds) if t == 'full_attention']}, not "
            f"{[i for i, t in enumerate(built) if t == 'full_attention']})"]


def _check_quantization(config: dict) -> list[str]:
    """Swift takes every layer's bits / group size from this dict alone, so each entry must carry them."""
    q = config.get("quantization")
    if q is None:
        return []
    if not isinstance(q, dict):
        raise _Unloadable("quantization must be an object with bits and group_size")
    if not _has_bits(q):
        raise _Unloadable("quantization needs integer bits and group_size")
    settings = ("bits", "group_size", "mode", "quant_method", "linear_class", "quantization_mode")
    found = [
        f"quantization[{k!r}] must be false or a dict with bits and group_size"
        for k, v in q.items() if k not in settings and v is not False and not (isinstance(v, dict) and _has_bits(v))
    ]
    if config.get("quantization_config") != q:
        found.append("quantization_config is not a copy of quantization")
    return found


def _check_shard_names(files: list[Path]) -> list[str]:
    if not files:
        raise _Unloadable("no .safetensors files")
    if len(files) == 1 and files[0].name == "model.safetensors":
        return []  # mlx-lm's single-file name; Swift loads every *.safetensors
    return [
        f"shard {f.name} is not named model-0000i-of-{len(files):05d}.safetensors"
        for f in files if not (m := _SHARD.match(f.name)) or int(m.group(2)) != len(files)
    ]


def _scan_shards(files: list[Path]) -> dict:
    try:
        return scan(files)
    except Exception as e:  # noqa: BLE001 - any unreadable shard is a problem to report
        raise _Unloadable(str(e)) from e


def _check_index(folder: Path, infos: dict) -> list[str]:
    """The index must describe the shards exactly, since loaders look tensors up through it."""
    index_file = folder / WEIGHT_INDEX
    if not index_file.is_file():
        return [f"no {WEIGHT_INDEX}"]
    found: list[str] = []
    index = _read_json(index_file, found)
    if index is None:
        return found
    wm = index.get("weight_map", {})
    if not isinstance(wm, dict):
        found.append(f"{WEIGHT_INDEX}: weight_map is not an object")
        wm = {}
    if list(wm) != sorted(wm):
        found.append("index weight_map is not sorted")
    if set(wm) != set(infos) or any(infos[k].file.name != v for k, v in wm.items() if k in infos):
        found.append("index weight_map does not match the shards' contents")
    meta = index.get("metadata")
    if not isinstance(meta, dict) or meta.get("total_size") != sum(i.nbytes for i in infos.values()):
        found.append("index metadata.total_size is not the sum of tensor bytes")
    return found


def _check_tensors(config: dict, infos: dict) -> list[str]:
    """Swift loads strictly: the declared modules' tensors, nothing missing, nothing extra."""
    q = config.get("quantization")
    expected: set[str] = set()
    found: list[str] = []
    for path, shape in swift_modules(config).items():
        quantized = len(shape) > 1 and f"{path}.scales" in infos
        if path.rsplit(".", 1)[-1] in BARE:
            expected.add(path)
            if (w := infos.get(path)) is not None and w.shape != shape:
                found.append(f"{path} has shape {w.shape}, Swift expects {shape}")
            continue
        expected |= {f"{path}.{kind}" for kind in (("weight", "scales", "biases") if quantized else ("weight",))}
        if quantized:
            found += _check_quantized(path, shape, q, infos)
        elif (w := infos.get(f"{path}.weight")) is not None and w.shape != shape:
            found.append(f"{path}.weight has shape {w.shape}, Swift expects {shape}")
        if not quantized and isinstance((q or {}).get(path), dict):
            found.append(f"quantization[{path!r}] gives bits but there is no {path}.scales: mlx-lm would quantize "
                         "it and miss tensors, Swift would keep it float")
    missing, extra = sorted(expected - set(infos)), sorted(set(infos) - expected)
    found += [f"missing tensor {n}" for n in missing[:5]]
    return found + [f"extra tensor {n} (Swift loads strictly)" for n in extra[:5]]


def _check_quantized(path: str, shape: tuple[int, ...], q: dict | None, infos: dict) -> list[str]:
    """Swift quantizes a layer because its scales exist, with bits / group size from the dict alone."""
    if q is None:
        return [f"{path} is quantized but config.json has no quantization dict"]
    entry = q.get(path)
    if entry is False:
        return [f"{path} has scales but quantization[{path!r}] is false (Swift would not quantize it)"]
    bits, gs = (entry["bits"], entry["group_size"]) if isinstance(entry, dict) else (q["bits"], q["group_size"])
    *out, n = shape
    want = {"weight": (*out, n * bits // 32), "scales": (*out, n // gs), "biases": (*out, n // gs)}
    found = [
        f"{path}.{kind} has shape {info.shape}; bits {bits} / group {gs} from the quantization dict imply {wshape}"
        for kind, wshape in want.items() if (info := infos.get(f"{path}.{kind}")) is not None and info.shape != wshape
    ]
    w = infos.get(f"{path}.weight")
    if w is not None and w.dtype != "U32":
        found.append(f"{path}.weight is quantized but stored as {w.dtype}, not U32")
    return found


def _check_norm_shift(config: dict, infos: dict) -> list[str]:
    """Swift's Qwen3.5 sanitize adds 1 to every norm weight when any tensor name holds "mtp." or a conv1d weight
    is in Hugging Face's layout [C, 1, K]: an export's norms are already shifted, so neither may occur."""
    if config["model_type"] not in QWEN3_5_TYPES:
        return []
    found = [f"tensor {n}: a multi-token-prediction tensor makes Swift add 1 to every norm" for n in infos
             if "mtp." in n][:5]
    return found + [f"{n} has shape {i.shape}, Hugging Face's layout: Swift would transpose it and add 1 to every norm"
                    for n, i in infos.items() if n.endswith("conv1d.weight") and i.shape[-1] != 1][:5]


def _check_tokenizer(folder: Path) -> list[str]:
    """The files Swift's tokenizer and chat templating read; readers differ in where they look for the template."""
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
    found = [f"no {name}" for name in names if not (folder / name).is_file()]
    tc_file = folder / "tokenizer_config.json"
    tc = _read_json(tc_file, found) if tc_file.is_file() else None
    if tc is not None and not tc.get("chat_template"):
        found.append("tokenizer_config.json has no inline chat_template")
    return found


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
