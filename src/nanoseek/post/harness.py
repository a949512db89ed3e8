"""lm-evaluation-harness on nanoseek's engine, in process: an lm-eval model class registered under the name
`nanoseek`, so any harness task runs on a nanoseek run or model directory with no server and no network:

    nanoseek eval RUN --lm-eval hellaswag,arc_easy [--include-path DIR] [--limit N]
    nanoseek lm-eval run --model nanoseek --model_args pretrained=RUN --tasks TASK ...   # lm_eval's own CLI

Scores are the engine's prompt log-probabilities (a request with max_new_tokens=0, as the server's `echo` uses:
batched, prefix-cached), tokenized as the harness's `hf` backend does (the context's trailing spaces move to the
continuation; an empty context is conditioned on BOS, else the end-of-text token). Generation runs the engine
with the task's `until` strings as stop strings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (the harness's own models first: an empty registry is filled only then)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from nanoseek.checkpoint.hf import load_pretrained
from nanoseek.data.tokenizer import end_token_ids, load_tokenizer
from nanoseek.device import resolve_device
from nanoseek.errors import NanoseekError
from nanoseek.infer.engine import Engine, EngineConfig
from nanoseek.infer.request import Completion, SamplingParams

_SCORE = SamplingParams(max_new_tokens=0, prompt_logprobs=1)  # the prompt's log-probabilities and top token


def _bos_id(source: Path, tokenizer: Any) -> int | None:
    """The BOS token transformers' AutoTokenizer (so the hf backend) reads from tokenizer_config.json, if any."""
    config = source / "tokenizer_config.json"
    bos = json.loads(config.read_text()).get("bos_token") if config.is_file() else None
    return tokenizer.token_to_id(bos) if isinstance(bos, str) else None


def evaluate_harness(
    model_dir: Path, tasks: list[str], include_path: Path | None, limit: int | None, device: str, dtype: str
) -> dict[str, Any]:
    """The harness's tasks on the model, in process → lm_eval's results (per task, its metrics)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path is not None:  # indexing the harness's own ~15,000 task files takes ~10 s: skipped when unneeded
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        manager = local if all(t in local.all_tasks for t in tasks) else None
    manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise NanoseekError(f"lm-eval has no task {', '.join(unknown)} (--include-path adds a folder of task YAMLs)")
    output = lm_eval.simple_evaluate(
        model=NanoseekLM(str(model_dir), device=device, dtype=dtype), tasks=tasks, task_manager=manager, limit=limit
    )
    return output["results"]


@register_model("nanoseek")
class NanoseekLM(TemplateLM):
    def __init__(
        self,
        pretrained: str,
        device: str = "auto",
        dtype: str = "auto",
        max_seqs: int = 32,
        batch_size: Any = None,
        max_length: int | None = None,
        **_: Any,
    ):
        super().__init__()
        source = Path(pretrained)
        if not (source / "tokenizer.json").is_file():
            raise NanoseekError(f"pretrained={pretrained}: no tokenizer.json there; give a run or model directory")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm_eval's CLI passes its default cuda:0; its hf backend falls back to the CPU alike
        chosen, weights = resolve_device(device, dtype)
        self.model = load_pretrained(source, device=chosen, dtype=weights, quantized=True).eval()
        self.tokenizer = load_tokenizer(source / "tokenizer.json")
        self.engine = Engine(self.model, decode=self.tokenizer.decode, config=EngineConfig(max_seqs=int(max_seqs)))
        self.stops = end_token_ids(self.tokenizer)
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self._prefix = _bos_id(source, self.tokenizer) or self.stops[-1]

    @property
    def eot_token_id(self) -> int:
        return self.stops[-1]

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def _score(self, pairs: list[tuple[list[int], list[int]]], show: bool) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) → (log-probability of the continuation, whether it is the greedy
        continuation), the pair cut on the left to the context length."""
        prompts = [(context + continuation)[-(self._max_length + 1) :] for context, continuation in pairs]
        scored: list[Completion] = []
        for start in tqdm(range(0, len(prompts), 256), desc="nanoseek scoring", disable=not show):
            scored += self.engine.generate(prompts[start : start + 256], _SCORE)
        results = []
        for (_, continuation), completion in zip(pairs, scored):
            entries = (completion.prompt_logprobs or [])[-len(continuation) :] if continuation else []
            results.append((sum(e.logprob for e in entries), all(e.top[0][0] == e.token for e in entries)))
        return results

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        results = self._score([(context, continuation) for _, context, continuation in requests], not disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-probability, in windows of the context length (each token scored once)."""
        totals = []
        for request in tqdm(requests, desc="nanoseek rolling", disable=disable_tqdm):
            (text,) = request.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self._max_length, 1)
            ]
            total = sum(logprob for logprob, _ in self._score(windows, show=False))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for request in requests:
            context, settings = request.args
            settings = dict(settings or {})
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(settings.get("max_gen_toks", 256))
            sampled = settings.get("do_sample", False) or float(settings.get("temperature", 0.0)) > 0
            prompts.append(self.tok_encode(context)[-max(1, self._max_length - budget) :])
            params.append(
                SamplingParams(
                    max_new_tokens=budget,
                    temperature=float(settings.get("temperature", 1.0)) if sampled else 0.0,
                    stop_strings=tuple(until),
                    stop_token_ids=self.stops,
                )
            )
        texts: list[str] = []
        for start in tqdm(range(0, len(prompts), 256), desc="nanoseek generating", disable=disable_tqdm):
            texts += [c.text for c in self.engine.generate(prompts[start : start + 256], params[start : start + 256])]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


def lm_eval_cli(argv: list[str]) -> None:
    """lm_eval's own command line, with the `nanoseek` model registered (importing this module did it)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
