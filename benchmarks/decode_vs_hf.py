"""Decoding: nanoseek's latent-cache engine vs transformers' `generate` on the same weights, the KV-cache size
against theory, and MTP self-speculative decoding (speed-up, acceptance).

    .venv/bin/python benchmarks/decode_vs_hf.py runs/tiny [--new 64] [--prompt-len 32]

Greedy everywhere, fp32 on the CPU. Speculation is measured on prompts cut from the training corpus, where a
trained MTP module has something to predict.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

import nanoseek
from nanoseek.data.corpus import default_corpus_files
from nanoseek.data.tokenizer import end_of_text_id, load_tokenizer
from nanoseek.infer.cache import LatentCache
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.speculative import speculative_greedy


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a run directory from `nanoseek train`")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--prompt-len", type=int, default=32)
    args = parser.parse_args()

    transformers.logging.set_verbosity_error()  # its load report lists the MTP layer it does not implement
    model = nanoseek.load_pretrained(args.model).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    config, engine = model.config, Engine(model)
    never_stop = SamplingParams(max_new_tokens=args.new)
    print(f"{args.model}: {torch.get_num_threads()} threads, fp32, greedy, prompt {args.prompt_len}, "
          f"{args.new} new tokens")
    print(f"{'batch':>5} {'nanoseek tok/s':>15} {'transformers tok/s':>19} {'ratio':>6}")
    for batch in (1, 16):
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=torch.Generator()
                                .manual_seed(batch))
        engine.generate(prompts[:, :4].tolist(), SamplingParams(max_new_tokens=4))  # warm up
        ours, t_ours = timed(lambda: engine.generate(prompts.tolist(), never_stop))
        with torch.no_grad():
            theirs, t_ref = timed(lambda: reference.generate(prompts, attention_mask=torch.ones_like(prompts),
                                                             max_new_tokens=args.new,
                                                             min_new_tokens=args.new, do_sample=False,
                                                             pad_token_id=0))
        agree = sum(o.token_ids == t[args.prompt_len:].tolist() for o, t in zip(ours, theirs))
        tokens = batch * args.new
        print(f"{batch:>5} {tokens / t_ours:>15.1f} {tokens / t_ref:>19.1f} {t_ref / t_ours:>5.2f}x"
              f"   ({agree}/{batch} sequences identical to transformers')")

    cache = LatentCache(config, 1, 16)
    theory = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * 4
    mha = 2 * config.num_attention_heads * config.qk_nope_head_dim * config.num_hidden_layers * 4
    print(f"KV cache: {cache.bytes_per_token()} B/token (theory (kv_lora_rank + qk_rope_head_dim) x layers x 4 = "
          f"{theory}); an MHA of the same heads: {mha} B/token ({100 * theory / mha:.1f} %)")

    if not len(model.mtp):
        print("no MTP module: speculative decoding skipped")
        return
    tokenizer = load_tokenizer(args.model / "tokenizer.json")
    text = default_corpus_files()[0].read_text(encoding="utf-8")
    stop = end_of_text_id(tokenizer)
    stops = () if stop is None else (stop,)
    plain_time = spec_time = accepted = drafted = produced = 0.0
    for start in range(20000, 120000, 20000):
        prompt = tokenizer.encode(text[start: start + 400]).ids[-args.prompt_len:]
        plain, t_plain = timed(lambda: engine.generate([prompt], SamplingParams(max_new_tokens=args.new,
                                                                                stop_token_ids=stops))[0])
        spec, t_spec = timed(lambda: speculative_greedy(model, prompt, args.new, stops))
        assert spec.token_ids == plain.token_ids, "speculation changed the greedy output"
        plain_time, spec_time = plain_time + t_plain, spec_time + t_spec
        accepted, drafted = accepted + spec.accepted, drafted + spec.drafted
        produced += len(plain.token_ids)
    print(f"MTP speculation (5 corpus prompts, {int(produced)} tokens, output identical to greedy): "
          f"acceptance {accepted / drafted:.1%}, {produced / plain_time:.1f} -> {produced / spec_time:.1f} tok/s, "
          f"speed-up {plain_time / spec_time:.2f}x")


if __name__ == "__main__":
    main()
