"""`nanoseek bench`: nanoseek side by side with transformers' DeepseekV3 on one config and identical weights.

Measures, on this machine: training tokens/s and MFU (against a matmul peak measured at start), decode tokens/s
(greedy, batch 1 and 16 after short prompts, batch 8 after long ones), MTP speculation in the batch when the model
is a trained run, and the KV-cache bytes
per token of MLA against MHA and GQA. Prints a markdown table (or JSON) and writes bench.md, bench.json, bench.png.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanoseek.checkpoint.hf import load_pretrained, save_pretrained
from nanoseek.config import DeepseekV3Config, ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.flops import model_stats
from nanoseek.infer.engine import Engine, EngineConfig, SamplingParams
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.registry import build_model
from nanoseek.presets import preset
from nanoseek.train.config import TrainConfig
from nanoseek.train.metrics import measure_peak_flops
from nanoseek.train.optim import build_optimizer
from nanoseek.train.precision import compile_blocks


def _median_seconds(steps: int, *runs: Callable[[], Any], warmup: int = 2) -> list[float]:
    """Median time of each callable, run in alternation: a machine whose speed drifts (turbo, neighbours) moves
    every side alike instead of favouring whichever ran first. Each timing ends once the GPU, if any, is done."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(steps):
        for run, spent in zip(runs, times):
            start = time.perf_counter()
            run()
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def _models(spec: str) -> tuple[DeepseekV3Model, Any, Path | None]:
    """nanoseek's model and transformers' on identical weights: a trained run/model directory, or a preset with
    seeded random weights (MTP left out: transformers does not implement it)."""
    import transformers

    transformers.logging.set_verbosity_error()  # its load report lists the MTP layer it does not implement
    path = Path(spec)
    if (path / "config.json").exists():
        ours = load_pretrained(path, dtype=torch.float32)
        return ours, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), path
    torch.manual_seed(0)
    ours = build_model(preset(spec).replace(num_nextn_predict_layers=0))
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return ours, reference, None


def bench_training(
    ours: DeepseekV3Model, reference: Any, batch: int, seq: int, steps: int, tolerance: float = 1e-4
) -> dict[str, float]:
    """A whole training step (forward + backward of the next-token loss, no MTP on either side, and an AdamW step),
    after checking that all sides compute the same loss. Three sides, timed in alternation:
      - transformers, with the fused AdamW its Trainer uses by default;
      - nanoseek as its trainer ran before the GPU-ready loop: eager, full logits then cross-entropy, torch's
        per-tensor AdamW ("eager");
      - nanoseek as its trainer runs now with train.compile=true: compiled blocks, the chunked head + cross-entropy,
        fused AdamW ("compiled")."""
    device = next(ours.parameters()).device
    ids = torch.randint(0, ours.config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = ids[:, :-1].to(device), ids[:, 1:].to(device)
    compiled = copy.deepcopy(ours)
    compile_blocks(compiled)
    for model in (ours, compiled, reference):
        model.train()
    optimizers = {
        "eager": torch.optim.AdamW(ours.parameters(), lr=1e-9, foreach=False),
        "compiled": build_optimizer(compiled, TrainConfig(lr=1e-9), device),
        "transformers": torch.optim.AdamW(reference.parameters(), lr=1e-9, fused=True),
    }

    def step(name: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            if name == "transformers":
                loss = F.cross_entropy(reference(inputs).logits.flatten(0, 1), targets.flatten())
            elif name == "eager":  # the loss as the model computed it before: full logits, then cross-entropy
                loss = F.cross_entropy(ours(inputs).flatten(0, 1).float(), targets.flatten())
            else:
                loss = compiled(inputs, targets, with_mtp=False).lm_loss
            loss.backward()
            optimizers[name].step()  # lr 1e-9: the weights stay put, so every timed step computes the same thing
            optimizers[name].zero_grad(set_to_none=True)
            return loss

        return run

    runs = {name: step(name) for name in ("eager", "compiled", "transformers")}
    losses = {name: run().item() for name, run in runs.items()}  # also compiles: before any timing
    if max(losses.values()) - min(losses.values()) > tolerance:
        raise NanoseekError(f"the sides' losses differ ({losses}): not the same model")
    seconds = dict(zip(runs, _median_seconds(steps, *runs.values())))
    return {
        "nanoseek_eager_tokens_per_s": batch * seq / seconds["eager"],
        "nanoseek_tokens_per_s": batch * seq / seconds["compiled"],
        "transformers_tokens_per_s": batch * seq / seconds["transformers"],
    }


def bench_decoding(ours: DeepseekV3Model, reference: Any, batch: int, prompt_len: int, new: int) -> dict[str, float]:
    """Greedy generation of `new` tokens per sequence after `prompt_len`-token prompts, prefill included, never
    stopping early; agreement counts identical sequences. nanoseek prefills up-projected and decodes absorbed over
    its latent cache; transformers' cache holds per-head keys and values."""
    ours.eval(), reference.eval()
    engine = Engine(ours, config=EngineConfig(speculation=False, max_seqs=batch))
    prompts = torch.randint(
        0, ours.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)
    ).to(engine.device)
    outputs: dict[str, Any] = {}

    def ours_decode() -> None:
        outputs["ours"] = engine.generate(prompts.tolist(), SamplingParams(max_new_tokens=new))

    @torch.no_grad()
    def reference_decode() -> None:
        outputs["theirs"] = reference.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )

    t_ours, t_ref = _median_seconds(3, ours_decode, reference_decode, warmup=1)
    agree = sum(m.token_ids == t[prompt_len:].tolist() for m, t in zip(outputs["ours"], outputs["theirs"]))
    return {
        "prompt_tokens": prompt_len,
        "nanoseek_tokens_per_s": batch * new / t_ours,
        "transformers_tokens_per_s": batch * new / t_ref,
        "identical_sequences": agree,
        "sequences": batch,
    }


def _generate_batches(
    engine: Engine, prompts: list[list[int]], params: SamplingParams, batch: int, into: dict[str, list], name: str
) -> None:
    """The prompts through the engine `batch` at a time; the completions go to into[name]."""
    into[name] = [c for i in range(0, len(prompts), batch) for c in engine.generate(prompts[i : i + batch], params)]


def bench_speculation(model: DeepseekV3Model, run: Path, prompt_len: int, new: int) -> dict[str, dict[str, float]]:
    """MTP speculation inside the batch against plain decoding, greedy, on prompts cut from the training corpus,
    at batch 1 and 8 (identical output checked)."""
    from nanoseek.data.sources import default_corpus_files
    from nanoseek.data.tokenizer import end_of_text_id, load_tokenizer

    tokenizer = load_tokenizer(run / "tokenizer.json")
    text = default_corpus_files()[0].read_text(encoding="utf-8")
    stop = end_of_text_id(tokenizer)
    params = SamplingParams(max_new_tokens=new, stop_token_ids=() if stop is None else (stop,))
    starts = [len(text) * (i + 1) // 10 for i in range(8)]
    prompts = [tokenizer.encode(text[start : start + 400]).ids[-prompt_len:] for start in starts]
    out = {}
    for batch in (1, 8):
        engines = {
            name: Engine(model, config=EngineConfig(speculation=name == "speculative", max_seqs=batch))
            for name in ("plain", "speculative")
        }
        outputs: dict[str, list] = {}
        sides = [
            functools.partial(_generate_batches, engines[name], prompts, params, batch, outputs, name)
            for name in ("plain", "speculative")
        ]
        t_plain, t_spec = _median_seconds(3, *sides, warmup=1)
        if [c.token_ids for c in outputs["plain"]] != [c.token_ids for c in outputs["speculative"]]:
            raise NanoseekError("speculative decoding changed the greedy output")
        produced = sum(len(c.token_ids) for c in outputs["plain"])
        spec = engines["speculative"]
        out[f"batch_{batch}"] = {
            "acceptance": spec.accepted / max(1, spec.drafted),
            "plain_tokens_per_s": produced / t_plain,
            "speculative_tokens_per_s": produced / t_spec,
            "speed_up": t_plain / t_spec,
        }
    return out


def kv_cache_table(config: ModelConfig) -> dict[str, dict[str, int]]:
    """Bytes per token (bf16, all layers) of MLA, an MHA of the same heads and a GQA with 8 query heads per KV head,
    at this config's shape and at DeepSeek-V3's."""
    out = {}
    for name, shape in (("this model", config), ("DeepSeek-V3 shape", preset("v3"))):
        stats = model_stats(shape)
        out[name] = {
            "MLA": stats.kv_bytes_per_token,
            "MHA": stats.kv_bytes_per_token_mha,
            "GQA": stats.kv_bytes_per_token_gqa,
        }
    return out


def run_bench(
    spec: str,
    batch: int,
    seq: int,
    steps: int,
    new_tokens: int,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    ours, reference, run = _models(spec)
    ours, reference = ours.to(device=device, dtype=dtype), reference.to(device=device, dtype=dtype)
    long_prompt = min(768, ours.config.max_position_embeddings - new_tokens)
    if not isinstance(ours.config, DeepseekV3Config):
        raise NanoseekError(
            f"nanoseek bench compares V3-layout models with transformers' DeepseekV3; this is "
            f"{ours.config.architecture}"
        )
    peak = measure_peak_flops(device, dtype)
    flops_per_token = model_stats(ours.config, seq_len=seq).flops_per_token
    # the sides' losses agree to fp32 rounding, or to bf16's (8 significant bits) in bf16
    training = bench_training(ours, reference, batch, seq, steps, 1e-4 if dtype == torch.float32 else 5e-2)
    for side in ("nanoseek_eager", "nanoseek", "transformers"):
        training[f"{side}_mfu"] = training[f"{side}_tokens_per_s"] * flops_per_token / peak
    result: dict[str, Any] = {
        "model": spec,
        "machine": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "measured_matmul_flops": peak,
        },
        "training": {"batch": batch, "seq": seq, "flops_per_token": flops_per_token, **training},
        "decoding": {
            **{f"batch_{b}": bench_decoding(ours, reference, b, 32, new_tokens) for b in (1, 16)},
            # long context: MLA's cache advantage shows once the context dwarfs the new tokens
            "long_context_batch_8": bench_decoding(ours, reference, 8, long_prompt, new_tokens),
        },
        "kv_cache_bytes_per_token": kv_cache_table(ours.config),
    }
    if run is not None and len(ours.mtp) and (run / "tokenizer.json").exists():
        result["speculation"] = bench_speculation(ours.eval(), run, 32, new_tokens)
    return result


def to_markdown(result: dict[str, Any]) -> str:
    t, machine = result["training"], result["machine"]
    lines = [
        f"nanoseek bench: `{result['model']}` on {machine['device']}, {machine['threads']} threads, "
        f"{machine['dtype']}; measured matmul peak {machine['measured_matmul_flops'] / 1e9:.0f} GFLOP/s",
        "",
        "| | nanoseek | transformers | nanoseek / transformers |",
        "|---|---|---|---|",
        f"| training tok/s (batch {t['batch']} × seq {t['seq']}, step with AdamW) | "
        f"{t['nanoseek_tokens_per_s']:.0f} | {t['transformers_tokens_per_s']:.0f} | "
        f"{t['nanoseek_tokens_per_s'] / t['transformers_tokens_per_s']:.2f}× |",
        f"| training MFU | {100 * t['nanoseek_mfu']:.1f} % | {100 * t['transformers_mfu']:.1f} % | |",
        f"| training tok/s, nanoseek eager with per-tensor AdamW (the loop before compile + fused AdamW) | "
        f"{t['nanoseek_eager_tokens_per_s']:.0f} | | "
        f"{t['nanoseek_eager_tokens_per_s'] / t['transformers_tokens_per_s']:.2f}× |",
    ]
    for name, d in result["decoding"].items():
        lines.append(
            f"| decode tok/s, {name.replace('_', ' ')}, {d['prompt_tokens']}-token prompts "
            f"({d['identical_sequences']}/{d['sequences']} "
            f"identical) | {d['nanoseek_tokens_per_s']:.1f} | {d['transformers_tokens_per_s']:.1f} | "
            f"{d['nanoseek_tokens_per_s'] / d['transformers_tokens_per_s']:.2f}× |"
        )
    for name, s in result.get("speculation", {}).items():
        lines += [
            "",
            f"MTP speculation in the batch, {name.replace('_', ' ')}: acceptance "
            f"{100 * s['acceptance']:.1f} %, {s['plain_tokens_per_s']:.1f} → "
            f"{s['speculative_tokens_per_s']:.1f} tok/s ({s['speed_up']:.2f}×), output identical to greedy",
        ]
    lines += [
        "",
        "| KV cache, bytes/token (bf16) | MLA | MHA | GQA (8 q heads per KV head) | MLA / MHA |",
        "|---|---|---|---|---|",
    ]
    for name, kv in result["kv_cache_bytes_per_token"].items():
        lines.append(
            f"| {name} | {kv['MLA']:,} | {kv['MHA']:,} | {kv['GQA']:,} | {100 * kv['MLA'] / kv['MHA']:.2f} % |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    t, d = result["training"], result["decoding"]["batch_16"]
    for ax, title, mine, theirs in (
        (axes[0], "training", t["nanoseek_tokens_per_s"], t["transformers_tokens_per_s"]),
        (axes[1], "decoding, batch 16", d["nanoseek_tokens_per_s"], d["transformers_tokens_per_s"]),
    ):
        ax.bar(["nanoseek", "transformers"], [mine, theirs], color=["tab:blue", "tab:gray"])
        ax.set_title(f"{title}: {mine / theirs:.2f}x")
        ax.set_ylabel("tokens/s")
    kv = result["kv_cache_bytes_per_token"]["DeepSeek-V3 shape"]
    axes[2].bar(list(kv), list(kv.values()), color=["tab:blue", "tab:red", "tab:orange"])
    axes[2].set_yscale("log")
    axes[2].set_title("KV cache per token, V3 shape (bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench(
    spec: str,
    out: Path,
    batch: int,
    seq: int,
    steps: int,
    new_tokens: int,
    as_json: bool,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise NanoseekError("nanoseek bench compares against transformers: pip install 'transformers>=5,<6'") from None
    result = run_bench(spec, batch, seq, steps, new_tokens, device, dtype)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(result)
    (out / "bench.md").write_text(markdown)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "bench.png")
    print(json.dumps(result, indent=2) if as_json else markdown + f"\nwrote {out}/bench.md, bench.json, bench.png")
