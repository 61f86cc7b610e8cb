"""Which bits each layer gets: uniform precision or a mixed recipe, plus router / embedding / lm_head rules.

One function, `QuantSpec.layer(path)`, decides for every quantizable module; the in-memory quantizer, the
exporter and the fit planner all call it, so they cannot disagree about an export's layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import Qwen3MLXError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)  # MLX affine quantization
GROUP_SIZES = (32, 64, 128)
# The MoE router picks experts; 4-bit rounding there changes which experts run, so it gets 8 bits.
ROUTER_BITS = 8

_MIXED = re.compile(r"^mixed_(\d)_(\d)$")
RECIPES = ("uniform", "mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6", "mixed_4_8", "mixed_6_8")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class QuantizeError(Qwen3MLXError):
    """A quantization request that cannot be carried out (bad bits, group size, recipe, source)."""


@dataclass(frozen=True)
class QuantSpec:
    """A quantization request.

    recipe "uniform": every layer at `bits`. "mixed_L_H": L bits by default and H bits for the layers that
    matter most (v_proj and down_proj of the first and last eighth of the layers and every third layer in
    between, and lm_head; the llama.cpp Q4_K_M choice); `bits` is then ignored.
    `embed_bits` / `lm_head_bits`: None follows the recipe, 0 leaves the tensor unquantized.
    `router_bits`: the MoE router (`mlp.gate`), 8 or 0 (unquantized).
    """

    bits: int = 4
    group_size: int = 64
    recipe: str = "uniform"
    embed_bits: int | None = None
    lm_head_bits: int | None = None
    router_bits: int = ROUTER_BITS
    mode: str = "affine"

    def __post_init__(self):
        if self.recipe != "uniform" and not _MIXED.match(self.recipe):
            raise QuantizeError(f"unknown recipe {self.recipe!r} (known: {', '.join(RECIPES)})")
        for what, b in (("bits", self.default_bits), ("high bits", self.high_bits)):
            if b not in SUPPORTED_BITS:
                raise QuantizeError(f"{what} {b} not supported (MLX affine: {', '.join(map(str, SUPPORTED_BITS))})")
        for what, b in (("embed bits", self.embed_bits), ("lm_head bits", self.lm_head_bits)):
            if b not in (None, 0, *SUPPORTED_BITS):
                raise QuantizeError(f"{what} {b} not supported (0 = unquantized, or {SUPPORTED_BITS})")
        if self.router_bits not in (0, 8):
            raise QuantizeError("router bits must be 8 or 0 (unquantized)")
        if self.group_size not in GROUP_SIZES:
            raise QuantizeError(f"group size {self.group_size} not supported (use 32, 64 or 128)")
        if self.mode != "affine":
            raise QuantizeError("only affine quantization is supported")

    @property
    def default_bits(self) -> int:
        m = _MIXED.match(self.recipe)
        return int(m.group(1)) if m else self.bits

    @property
    def high_bits(self) -> int:
        m = _MIXED.match(self.recipe)
        return int(m.group(2)) if m else self.bits

    @property
    def label(self) -> str:
        name = f"{self.bits}-bit" if self.recipe == "uniform" else self.recipe
        return f"{name} g{self.group_size}"

    def defaults(self) -> dict:
        return {"group_size": self.group_size, "bits": self.default_bits, "mode": self.mode}

    def layer_bits(self, path: str, num_layers: int, tied: bool = False, in_dims: int | None = None) -> int:
        """Bits for the quantizable module at `path` (0 = left unquantized), whose rows are `in_dims` wide."""
        if in_dims is not None and in_dims % self.group_size:
            return 0  # no whole groups: left in float, as mlx-lm leaves such a layer
        mixed = self.recipe != "uniform"
        if path.endswith(("mlp.gate", "shared_expert_gate")):  # routers and Qwen3.5's shared-expert gates
            return self.router_bits
        if path == "model.embed_tokens":
            if self.embed_bits is not None:
                return self.embed_bits
            # Tied embeddings are also the output projection, which mixed recipes protect.
            return self.high_bits if (mixed and tied) else self.default_bits
        if path == "lm_head":
            if self.lm_head_bits is not None:
                return self.lm_head_bits
            return self.high_bits if mixed else self.default_bits
        if mixed and (path.endswith("v_proj") or path.endswith("down_proj")):
            m = _LAYER.match(path)
            if m and _more_bits(int(m.group(1)), num_layers):
                return self.high_bits
        return self.default_bits

    def layer(self, path: str, num_layers: int, tied: bool = False, in_dims: int | None = None) -> bool | dict:
        """What nn.quantize's predicate returns: True (defaults), an override dict, or False (unquantized)."""
        bits = self.layer_bits(path, num_layers, tied, in_dims)
        if bits == 0:
            return False
        if bits == self.default_bits:
            return True
        return {"group_size": self.group_size, "bits": bits, "mode": self.mode}


def _more_bits(index: int, num_layers: int) -> bool:
    return index < num_layers // 8 or index >= 7 * num_layers // 8 or (index - num_layers // 8) % 3 == 2


# Best quality first: what `quantize --fit` tries in order.
FIT_CANDIDATES: tuple[QuantSpec, ...] = (
    QuantSpec(bits=8),
    QuantSpec(bits=6),
    QuantSpec(recipe="mixed_4_6"),
    QuantSpec(bits=4),
    QuantSpec(recipe="mixed_3_6"),
    QuantSpec(bits=3),
    QuantSpec(recipe="mixed_2_6"),
    QuantSpec(bits=2),
)
