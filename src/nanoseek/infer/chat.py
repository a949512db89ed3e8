"""Chat prompts: the chat template of the model's tokenizer_config.json when it has one (Jinja, as HF renders
it), else a plain role-prefixed transcript whose next speaker line is the stop string."""

from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant")
PLAIN_STOP = "\nUser:"


class ChatTemplate:
    def __init__(self, model_dir: Path):
        config = model_dir / "tokenizer_config.json"
        raw = json.loads(config.read_text()) if config.exists() else {}
        self.template = raw.get("chat_template")
        self.special = {k: v for k, v in raw.items() if k in ("bos_token", "eos_token") and isinstance(v, str)}

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self.template else (PLAIN_STOP,)

    def render(self, messages: list[dict[str, str]]) -> str:
        if self.template:
            import jinja2

            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
            return env.from_string(self.template).render(messages=messages, add_generation_prompt=True,
                                                         **self.special)
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"


def check_messages(messages: object) -> list[dict[str, str]]:
    """→ the messages, or ValueError naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': string}}")
    return messages
