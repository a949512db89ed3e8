"""Chat prompts: the chat template of the model's tokenizer_config.json when it has one (Jinja, as HF renders
it), else a plain role-prefixed transcript whose next speaker line is the stop string."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from nanoseek.data.tokenizer import TextEncoder

ROLES = ("system", "user", "assistant")
PLAIN_STOP = "\nUser:"


class ChatTemplate:
    """ValueError (naming the file) if tokenizer_config.json is not a JSON object or its template does not parse."""

    def __init__(self, model_dir: Path):
        config = model_dir / "tokenizer_config.json"
        try:
            raw = json.loads(config.read_bytes()) if config.exists() else {}
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{config} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{config} must hold a JSON object")
        self.template = raw.get("chat_template")
        if isinstance(self.template, list):  # HF's named form: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in self.template if isinstance(t, dict)}
            self.template = named.get("default")
        if self.template is not None and not isinstance(self.template, str):
            raise ValueError(f"{config}: 'chat_template' must be a string")
        self.special = {
            k: v for k, v in raw.items() if k in ("bos_token", "eos_token", "pad_token") and isinstance(v, str)
        }
        self._compiled = None
        if self.template:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            # a template comes with the model: sandboxed, as transformers renders it (no attribute walks to Python
            # internals, no mutation of the messages)
            environment = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            environment.globals["raise_exception"] = _raise_exception
            try:
                self._compiled = environment.from_string(self.template)
            except jinja2.TemplateError as e:
                raise ValueError(f"{config}: the chat template does not parse: {e}") from None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self.template else (PLAIN_STOP,)

    def render(self, messages: list[dict[str, str]]) -> str:
        """ValueError if the template fails on these messages (its own checks raise, e.g. on role order)."""
        if self._compiled is not None:
            import jinja2

            try:
                return self._compiled.render(messages=messages, add_generation_prompt=True, **self.special)
            except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
                raise ValueError(f"the chat template cannot render these messages: {e}") from None
        lines = [
            f"{m['role'].capitalize()}{' (' + m['name'] + ')' if 'name' in m else ''}: {m['content']}" for m in messages
        ]
        return "\n".join(lines) + "\nAssistant:"

    def render_ids(
        self, messages: list[dict[str, str]], encode: Callable[[str], list[int]], as_text: TextEncoder
    ) -> list[int]:
        """The prompt's ids: the template's own text encoded with its control tokens, the messages' words as text.
        Where a message spells a control token, that spelling is swapped for a placeholder (unguessable: a fresh
        nonce) before rendering and encoded as text after, so a user cannot forge a turn or an end of sentence."""
        nonce = secrets.token_hex(8)
        spelled: list[str] = []

        def shield(match: re.Match) -> str:
            spelled.append(match.group())
            return f"\ue000{nonce}{len(spelled) - 1}\ue001"

        pattern = re.compile("|".join(map(re.escape, as_text.controls))) if as_text.controls else None
        if pattern is not None:
            messages = [{k: v if k == "role" else pattern.sub(shield, v) for k, v in m.items()} for m in messages]
        pieces = re.split(f"\ue000{nonce}(\\d+)\ue001", self.render(messages))
        ids = []
        for i, piece in enumerate(pieces):  # text, placeholder index, text, ...
            ids += as_text(spelled[int(piece)]) if i % 2 else encode(piece) if piece else []
        return ids


def _raise_exception(message: str) -> None:
    """transformers' template global: a template's own check on the messages (role order, say) fails the request."""
    raise ValueError(message)


def check_messages(messages: object) -> list[dict[str, str]]:
    """→ the messages with string contents (a content given as a list of text parts is joined by newlines, as
    vLLM does) and their names, for the template, or ValueError naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or set(m) - {"role", "content", "name"}:
            raise ValueError(
                f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': string or text parts}}"
            )
        content = m.get("content")
        if (
            isinstance(content, list)
            and content
            and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) and len(p) == 2
                for p in content
            )
        ):
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(
                f"messages[{i}].content must be a string or a list of {{'type': 'text', 'text': "
                "string}} parts (this server takes text only)"
            )
        if not isinstance(m.get("name", ""), str):
            raise ValueError(f"messages[{i}].name must be a string")
        checked.append({"role": m["role"], "content": content, **({"name": m["name"]} if "name" in m else {})})
    return checked
