"""Model configs: one class per generation, each beside its model (models/<generation>/config.py), on the shared base
of models/common/config.py. Importing this module registers them all, so that `ModelConfig.from_hf_dict` and
`ModelConfig.load_json` read any config.json into the class of its model_type:

    deepseek_v3, deepseek_v2 → DeepseekV3Config     deepseek_v32 → DeepseekV32Config (V3's, plus the indexer)
    deepseek_v4 → DeepseekV4Config                  llama → LlamaConfig (the dense baseline)
"""

from __future__ import annotations

from nanoseek.models.common.config import ModelConfig, MoEConfig, RopeScaling, yarn_mscale
from nanoseek.models.deepseek_v3.config import DeepseekV3Config
from nanoseek.models.deepseek_v4.config import DeepseekV4Config
from nanoseek.models.deepseek_v32.config import DeepseekV32Config
from nanoseek.models.llama.config import LlamaConfig

__all__ = [
    "DeepseekV3Config",
    "DeepseekV32Config",
    "DeepseekV4Config",
    "LlamaConfig",
    "ModelConfig",
    "MoEConfig",
    "RopeScaling",
    "yarn_mscale",
]
