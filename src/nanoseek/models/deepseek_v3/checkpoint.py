"""DeepSeek-V3's checkpoint names (DeepSeek's release and transformers' DeepseekV3ForCausalLM, V2's too): experts
one per key (`mlp.experts.E.gate_proj.weight`; ours are stacked [E, out, in] with gate and up fused), MTP module k
stored as layer num_hidden_layers + k with copies of the shared embedding and head that we write but never read."""

from __future__ import annotations

from collections.abc import Iterable

from nanoseek.config import ModelConfig
from nanoseek.models.common.checkpoint import Entry

_ATTENTION = {
    "q_proj": "q_proj",
    "q_down": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "q_up": "q_b_proj",
    "kv_down": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "kv_up": "kv_b_proj",
    "out_proj": "o_proj",
}


def mlp_entries(ours: str, hf: str) -> list[Entry]:
    return [
        Entry(f"{ours}.gate_up.weight", ((f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"),)),
        Entry(f"{ours}.down.weight", ((f"{hf}.down_proj.weight",),)),
    ]


class V3Checkpoint:
    def attention_entries(self, config: ModelConfig, ours: str, hf: str) -> list[Entry]:
        names = ["kv_down", "kv_norm", "kv_up", "out_proj"]
        names += ["q_proj"] if config.q_lora_rank is None else ["q_down", "q_norm", "q_up"]
        return [Entry(f"{ours}.attn.{n}.weight", ((f"{hf}.self_attn.{_ATTENTION[n]}.weight",),)) for n in names]

    def block_entries(self, config: ModelConfig, ours: str, hf: str, layer_index: int) -> list[Entry]:
        entries = self.attention_entries(config, ours, hf)
        entries += [
            Entry(f"{ours}.attn_norm.weight", ((f"{hf}.input_layernorm.weight",),)),
            Entry(f"{ours}.mlp_norm.weight", ((f"{hf}.post_attention_layernorm.weight",),)),
        ]
        if not config.is_moe_layer(layer_index):
            return entries + mlp_entries(f"{ours}.mlp", f"{hf}.mlp")
        experts = range(config.n_routed_experts)
        entries += [
            Entry(f"{ours}.mlp.router.weight", ((f"{hf}.mlp.gate.weight",),)),
            Entry(f"{ours}.mlp.router.expert_bias", ((f"{hf}.mlp.gate.e_score_correction_bias",),)),
            Entry(
                f"{ours}.mlp.experts.gate_up",
                tuple(
                    (f"{hf}.mlp.experts.{e}.gate_proj.weight", f"{hf}.mlp.experts.{e}.up_proj.weight") for e in experts
                ),
                True,
            ),
            Entry(
                f"{ours}.mlp.experts.down", tuple((f"{hf}.mlp.experts.{e}.down_proj.weight",) for e in experts), True
            ),
        ]
        if config.n_shared_experts:
            entries += mlp_entries(f"{ours}.mlp.shared", f"{hf}.mlp.shared_experts")
        return entries

    def entries(self, config: ModelConfig) -> list[Entry]:
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        entries = [
            Entry("embed.weight", (("model.embed_tokens.weight",),)),
            Entry("norm.weight", (("model.norm.weight",),)),
            Entry("head.weight", ((head,),)),
        ]
        for i in range(config.num_hidden_layers):
            entries += self.block_entries(config, f"layers.{i}", f"model.layers.{i}", i)
        for k in range(config.num_nextn_predict_layers):
            index = config.num_hidden_layers + k
            hf = f"model.layers.{index}"
            entries += [Entry(f"mtp.{k}.{n}.weight", ((f"{hf}.{n}.weight",),)) for n in ("enorm", "hnorm", "eh_proj")]
            entries += [Entry(f"mtp.{k}.norm.weight", ((f"{hf}.shared_head.norm.weight",),))]
            entries += self.block_entries(config, f"mtp.{k}.block", hf, index)
        return entries

    def aliases(self, keys: Iterable[str]) -> dict[str, str]:
        return {}

    def mtp_key(self, config: ModelConfig, depth: int) -> str:
        return f"model.layers.{config.num_hidden_layers + depth}.eh_proj.weight"

    def written_not_read(self, key: str, config: ModelConfig) -> bool:
        """MTP layers' copies of the shared embedding and head, and MTP layers beyond the config's."""
        parts = key.split(".")
        if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= config.num_hidden_layers:
            return (
                ".embed_tokens." in key
                or ".shared_head.head." in key
                or int(parts[2]) >= config.num_hidden_layers + config.num_nextn_predict_layers
            )
        return False

    def shared_copies(self, config: ModelConfig) -> dict[str, str]:
        copies = {}
        for k in range(config.num_nextn_predict_layers):
            hf = f"model.layers.{config.num_hidden_layers + k}"
            copies |= {f"{hf}.embed_tokens.weight": "embed.weight", f"{hf}.shared_head.head.weight": "head.weight"}
        return copies
