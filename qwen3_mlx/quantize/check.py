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
        problems += _check_value_types(config)
        problems += _check_quantization(config)
        files = sorted(folder.glob("*.safetensors"))
        problems += _check_shard_names(files)
        infos = _scan_shards(files)
        problems += _check_index(folder, infos) + _check_tensors(config, infos) + _check_tokenizer(folder)
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
    if mt not in ("qwen3", "qwen3_moe"):
        raise _Unloadable(f"model_type {mt!r} is not qwen3 / qwen3_moe")
    keys = DENSE_KEYS + (MOE_KEYS if mt == "qwen3_moe" else ())
    if missing := [f"config.json lacks flat key {k!r}" for k in keys if k not in config]:
        raise _Unloadable(*missing)
    return config


def _check_value_types(config: dict) -> list[str]:
    """Swift decodes these into typed fields: a value of another JSON type fails the decode."""
    found = []
    if not _is_number(config["rope_theta"]):
        found.append("rope_theta must be a number")
    if not isinstance(config["tie_word_embeddings"], bool):
        found.append("tie_word_embeddings must be a boolean")
    rs = config["rope_scaling"]
    if rs is not None and not (isinstance(rs, dict) and all(isinstance(v, str) or _is_number(v) for v in rs.values())):
        found.append("rope_scaling must be null or a dict of strings/numbers (Swift: [String: StringOrNumber])")
    return found


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
        expected |= {f"{path}.{kind}" for kind in (("weight", "scales", "biases") if quantized else ("weight",))}
        if quantized:
            found += _check_quantized(path, shape, q, infos)
        elif (w := infos.get(f"{path}.weight")) is not None and w.shape != shape:
            found.append(f"{path}.weight has shape {w.shape}, Swift expects {shape}")
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
