"""Shared test fixtures: tiny configs and transformers reference models built offline."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig, RopeScaling
from nanoseek.config import DeepseekV3Config, LlamaConfig


def tiny_config(**overrides) -> ModelConfig:
    """A few-layer V3 shape small enough to run in milliseconds; V3.2's fields among the overrides make it a V3.2."""
    return DeepseekV3Config(**TINY).replace(**overrides)


def tiny_dense_config(**overrides) -> LlamaConfig:
    """The dense baseline (Llama layout) at tiny_config's width: 2 key/value heads of 8."""
    shape = {k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
    base = LlamaConfig(
        **shape,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        initializer_range=0.02,
    )
    return base.replace(**overrides)


TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    max_position_embeddings=128,
    initializer_range=0.02,
)


YARN = RopeScaling(
    factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0
)
# DeepSeek-V3.2's indexer at tiny shape. 8 heads: with few, ReLU zeros every head's score for many keys, and ties
# make top-k arbitrary; top 6, so sequences of a few dozen tokens drop most of what a query could see
V32 = dict(index_n_heads=8, index_head_dim=8, index_topk=6)


# DeepSeek's released checkpoints: config.json and every tensor's name, dtype and shape, written from DeepSeek's
# files (tests/fixtures/releases/*.json say how)
RELEASE_FIXTURES = Path(__file__).parent / "fixtures" / "releases"


def _blocks(config: dict) -> dict[str, list[str]]:
    """The layer prefixes each of the fixtures' sets stands for, read from the raw config.json."""
    layers, mtp = config["num_hidden_layers"], config.get("num_nextn_predict_layers", 0)
    if config["model_type"] != "deepseek_v4":
        blocks = [f"model.layers.{i}" for i in range(layers + mtp)]  # V3 stores MTP module k as layer `layers + k`
        dense = config["first_k_dense_replace"]
        return {"blocks": blocks, "dense": blocks[:dense], "moe": blocks[dense:], "mtp": blocks[layers:]}
    main, extra = [f"layers.{i}" for i in range(layers)], [f"mtp.{k}" for k in range(mtp)]
    hashed, ratios = main[: config["num_hash_layers"]], config["compress_ratios"]
    return {
        "blocks": main + extra,
        "hash": hashed,
        "scored": [b for b in main + extra if b not in hashed],
        "csa": [b for b, r in zip(main, ratios) if r == 4],
        "hca": [b for b, r in zip(main, ratios) if r == 128],
        "mtp": extra,
    }


def _spec(name: str) -> tuple[dict, list]:
    spec = json.loads((RELEASE_FIXTURES / f"{name}.json").read_text())
    parent = _spec(spec["extends"].removesuffix(".json"))[1] if "extends" in spec else []
    return spec["config"], parent + spec["tensors"]


def released(name: str) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]]]:
    """A release's config.json and {tensor name: (safetensors dtype, shape)}."""
    config, templates = _spec(name)
    blocks, experts = _blocks(config), range(config["n_routed_experts"])
    tensors = {}
    for template, dtype, shape, *over in templates:
        for block in blocks[over[0]] if over else [""]:
            for expert in experts if "{e}" in template else [0]:
                tensors[template.format(b=block, e=expert)] = (dtype, tuple(shape))
    return config, tensors


def release_name_pattern(name: str) -> re.Pattern:
    """Matches the tensor names of release `name` at any layer count, expert count and block kind."""
    templates = [
        re.escape(t[0]).replace(r"\{b\}", r"(model\.)?(layers|mtp)\.\d+").replace(r"\{e\}", r"\d+")
        for t in _spec(name)[1]
    ]
    return re.compile("|".join(f"(?:{t})" for t in templates))


HF_CLASSES = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
}


# weights of every parameter a parity test draws: at 0.2 (not the 0.02 of initialization) attention is far from a
# causal average and the logits spread over several units, so a wrong softmax scale, YaRN mscale or RoPE moves them
# by far more than the tolerance
PARITY_STD = 0.2


def randomize_(model: torch.nn.Module, std: float = PARITY_STD) -> torch.nn.Module:
    """Every parameter and routing bias of `model` (nanoseek's or transformers') random: norms around 1, biases
    around 0, matrices at `std`, so that a wrong mapping or formula cannot hide behind ones, zeros or tiny weights."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("norm.weight"):
                tensor.copy_(1 + 0.2 * torch.randn_like(tensor))
            elif name.endswith(("norm.bias", "e_score_correction_bias", "expert_bias")):
                tensor.copy_(0.05 * torch.randn_like(tensor))
            elif tensor.is_floating_point() and tensor.dim() >= 2 and isinstance(tensor, torch.nn.Parameter):
                tensor.normal_(0, std)
    return model


def assert_logits_match(got: torch.Tensor, expected: torch.Tensor, relative: float = 4e-6) -> None:
    """The same logits: max|Δ| within `relative` of the largest logit (fp32: 4e-6; bf16: a few 2⁻⁸) and the same
    top-1 token everywhere it is not a near tie."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    got, expected = got.float(), expected.float()
    bound = relative * max(1.0, expected.abs().max().item())
    delta = (got - expected).abs().max().item()
    assert delta <= bound, f"max |Δlogit| {delta:.3g} > {bound:.3g}"
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * bound
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear]), "top-1 tokens differ"


def hf_model(config: ModelConfig, seed: int = 0):
    """transformers' DeepseekV3/V32/V2ForCausalLM for the config, every weight random (`randomize_`)."""
    import transformers

    hf_dict = config.to_hf_dict()
    kind, model_cls = (getattr(transformers, name) for name in HF_CLASSES[hf_dict["model_type"]])
    hf_config = kind.from_dict({k: v for k, v in hf_dict.items() if k != "architectures"})
    torch.manual_seed(seed)
    return randomize_(model_cls(hf_config).eval())


def full_forward_greedy(model: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    """`tokens` greedy tokens after `prompt`, each the argmax of the full forward re-run on the sequence so far (no
    cache): the reference for the engine's and the server's greedy decoding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(tokens):
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids[len(prompt) :]


def micro_model_dir(
    directory, text: str, tokenizer_vocab: int, model_vocab: int, chat: bool = False, std: float | None = None
):
    """A model directory with random weights (tiny_config, one MTP module; `std`: every weight drawn at it, see
    randomize_, instead of initialized) and a tokenizer trained on `text` (`chat`: with the chat template's
    tokenizer_config.json)."""
    import nanoseek
    from nanoseek.data.chat_format import write_chat_tokenizer_files
    from nanoseek.data.tokenizer import train_tokenizer, write_tokenizer_files

    tokenizer = train_tokenizer([text], tokenizer_vocab)
    torch.manual_seed(0)
    model = nanoseek.build_model(tiny_config(vocab_size=model_vocab, num_nextn_predict_layers=1))
    nanoseek.save_pretrained(model if std is None else randomize_(model, std), directory)
    (write_chat_tokenizer_files if chat else write_tokenizer_files)(tokenizer, directory)
    return directory


def cli_exit(capsys, *argv: str) -> int:
    """`nanoseek.cli.main(argv)`'s exit code, asserting that a failure is exactly one `nanoseek: error:` line on
    stderr (a progress bar aside) and no traceback. Any exception other than a user error propagates out of main."""
    from hypothesis import event

    from nanoseek.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    if code:
        lines = [line for line in err.strip().splitlines() if line.startswith("nanoseek")]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("nanoseek: error: "), err
        assert "Traceback" not in err, err
    event(f"exit {code}")
    return code


def fuzz(default: int, long: int, **strategies) -> Callable:
    """`@given(**strategies)` with fixed seeds and no deadline, run as two tests: `[default]` with `default` examples
    in the default run, and `[long]` with `long` examples under `pytest -m slow`. One body, two example budgets:
    hypothesis reads a test's settings where it was wrapped, so each budget wraps the body once. Health checks stay
    on (a strategy that filters too much, draws too much or is too slow to generate fails the test), all but the
    one for function-scoped fixtures: the bodies that take one (capsys) read and reset it per example."""
    from hypothesis import HealthCheck, given, settings

    def decorate(body: Callable) -> Callable:
        runs = {
            name: settings(
                deadline=None,
                derandomize=True,
                max_examples=examples,
                suppress_health_check=[HealthCheck.function_scoped_fixture],
            )(given(**strategies)(body))
            for name, examples in (("default", default), ("long", long))
        }

        def test(budget: str, **fixtures):
            runs[budget](**fixtures)

        fixtures = list(inspect.signature(runs["default"]).parameters.values())  # what hypothesis leaves to pytest
        test.__signature__ = inspect.Signature(
            [
                inspect.Parameter("budget", inspect.Parameter.KEYWORD_ONLY),
                *(f.replace(kind=inspect.Parameter.KEYWORD_ONLY) for f in fixtures),
            ]
        )
        test.__name__, test.__qualname__, test.__doc__ = body.__name__, body.__qualname__, body.__doc__
        test.__module__ = body.__module__
        return pytest.mark.parametrize("budget", ["default", pytest.param("long", marks=pytest.mark.slow)])(test)

    return decorate


class EvenLength:
    """A task (nanoseek.post.tasks.Task) whose reward a tiny random model meets about half the time — a response of
    an even number of characters — so that GRPO's groups differ and eval's accuracy is neither 0 nor 1."""

    name = "even-length"

    def sample(self, rng):
        from nanoseek.post.reward import Problem

        n = rng.randint(0, 10**6)
        return Problem(f"Is {n} even?", "yes" if n % 2 == 0 else "no")

    def reward(self, problem, response):
        from nanoseek.post.reward import Reward

        even = len(response) % 2 == 0
        return Reward(float(even), even, False)

    def demonstration(self, problem):
        return f"<think>last digit</think> <answer>{problem.answer}</answer>"


def run_process_group(command: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) in a session of its own, every process of which (torchrun's
    workers too) is killed when it returns, fails or times out: a failing distributed test leaves nothing running."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
