"""Which of a model's weights stay as released when a quantized checkpoint is loaded with `quantized=True`, and
the swap of their modules for the ones that hold them so (fp8/stored.py).

A linear stays quantized when its file tensors are quantized and join along rows without splitting a scale block
(V3's gate_proj + up_proj fused into one GEMM: each part a whole number of 128-row blocks; FP4 rows join freely);
the routed experts when both their GEMMs do; a parameter its module lists in `stored_weights` (V4's grouped output
projection `wo_a`). Anything else is dequantized into the model's dtype as before (the rare ragged block).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.checkpoint.files import SafetensorsDir
from nanoseek.fp8.quant import TILE
from nanoseek.fp8.stored import QuantizedExperts, QuantizedLinear, StoredWeight
from nanoseek.models.common.checkpoint import Entry
from nanoseek.models.common.moe import RoutedExperts

Stored = tuple[torch.Tensor, torch.Tensor, str]  # values, scale, encoding


def _join(pieces: list[Stored]) -> Stored | None:
    """Row blocks of one weight → one stored weight, None where a piece would split a scale block."""
    encodings = {p[2] for p in pieces}
    dtypes = {(p[0].dtype, p[1].dtype) for p in pieces}
    if len(encodings) > 1 or len(dtypes) > 1:
        return None
    if len(pieces) == 1:
        return pieces[0]
    if pieces[0][2] == "fp8" and any(p[0].shape[0] % TILE for p in pieces[:-1]):
        return None
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]), pieces[0][2]


def stored_entry(entry: Entry, source: SafetensorsDir) -> Stored | None:
    """The entry's tensor as the files store it (experts stacked along a new dim 0), None where it is not quantized
    or cannot stay so."""
    if entry.rope_head_dim or any(keys[0] not in source for keys in entry.parts):
        return None
    slices = []
    for keys in entry.parts:
        pieces = [source.stored(k) for k in keys]
        if any(p is None for p in pieces) or (joined := _join(pieces)) is None:
            return None
        slices.append(joined)
    if not entry.stacked:
        return slices[0]
    if len({(s[0].shape, s[1].shape) for s in slices}) > 1:
        return None
    return torch.stack([s[0] for s in slices]), torch.stack([s[1] for s in slices]), slices[0][2]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """A parameter's name → (the parent of its module, the module's attribute name, the module)."""
    module_name = name.rpartition(".")[0]
    parent_name, _, attribute = module_name.rpartition(".")
    return model.get_submodule(parent_name), attribute, model.get_submodule(module_name)


def swappable(model: nn.Module, stored: dict[str, Stored]) -> dict[str, Stored]:
    """The entries of `stored` whose modules can hold them as stored: nn.Linear weights, routed experts whose
    gate_up and down are both stored, and the parameters a module lists in `stored_weights`."""
    kept = {}
    for name, weight in stored.items():
        _, _, module = _owner(model, name)
        if name.rpartition(".")[2] in getattr(module, "stored_weights", ()):
            kept[name] = weight
        elif type(module) is nn.Linear and name.endswith(".weight") and module.bias is None:
            kept[name] = weight
        elif isinstance(module, RoutedExperts):
            prefix = name.rpartition(".")[0]
            if f"{prefix}.gate_up" in stored and f"{prefix}.down" in stored:
                kept[name] = weight
    return kept


def install_stored(model: nn.Module, stored: dict[str, Stored]) -> dict[str, torch.Tensor]:
    """Swaps the modules of `stored` (from `swappable`) for ones holding meta-device placeholders of the stored
    tensors, so that the model's `to_empty` allocates them in their own dtypes; returns the state-dict entries
    the stored tensors then load as (`X.values`, `X.scale`)."""

    def placeholder(weight: Stored) -> StoredWeight:
        return StoredWeight(weight[0].to("meta"), weight[1].to("meta"), weight[2])

    state = {}
    for name, weight in stored.items():
        state |= {f"{name}.values": weight[0], f"{name}.scale": weight[1]}
        parent, attribute, module = _owner(model, name)
        if name.rpartition(".")[2] in getattr(module, "stored_weights", ()):
            delattr(module, name.rpartition(".")[2])  # a parameter's place, taken by a module
            setattr(module, name.rpartition(".")[2], placeholder(weight))
        elif isinstance(module, RoutedExperts):  # gate_up comes first; the down projection is swapped with it
            down = stored[name.removesuffix(".gate_up") + ".down"]
            setattr(parent, attribute, QuantizedExperts(placeholder(weight), placeholder(down), module.limit))
        elif not isinstance(module, QuantizedExperts):
            setattr(parent, attribute, QuantizedLinear(placeholder(weight)))
    return state
