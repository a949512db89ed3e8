"""Training-step speed: nanoseek vs transformers' DeepseekV3ForCausalLM on the same config and weights.

    .venv/bin/python benchmarks/train_step_vs_hf.py [--preset tiny] [--batch 8] [--seq 256] [--steps 10]

Both run forward + backward of the LM loss in fp32 on this machine; the script first checks that the two losses are
equal, then prints the median step time of each and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

import nanoseek


def median_step_seconds(step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = nanoseek.ModelConfig.preset(args.preset).replace(num_nextn_predict_layers=0)
    ours = nanoseek.Transformer(config)
    with tempfile.TemporaryDirectory() as tmp:
        nanoseek.save_pretrained(ours, tmp)
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    ours.train(), reference.train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def ours_step() -> torch.Tensor:
        ours.zero_grad(set_to_none=True)
        loss = ours(inputs, targets).lm_loss
        loss.backward()
        return loss

    def reference_step() -> torch.Tensor:
        reference.zero_grad(set_to_none=True)
        logits = reference(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return loss

    diff = (ours_step() - reference_step()).abs().item()
    assert diff < 1e-4, f"losses differ by {diff}: not the same model"
    t_ours = median_step_seconds(ours_step, args.steps)
    t_ref = median_step_seconds(reference_step, args.steps)
    tokens = args.batch * args.seq
    print(f"preset {args.preset}, batch {args.batch} x seq {args.seq}, fp32, {torch.get_num_threads()} threads")
    print(f"nanoseek     {t_ours * 1e3:8.1f} ms/step  {tokens / t_ours:9.0f} tok/s")
    print(f"transformers {t_ref * 1e3:8.1f} ms/step  {tokens / t_ref:9.0f} tok/s")
    print(f"speed-up (transformers time / nanoseek time): {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
