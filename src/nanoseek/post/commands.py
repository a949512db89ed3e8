"""The post-training commands: `nanoseek sft`, `nanoseek rl`, `nanoseek eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseek.device import add_device_options, resolve_device
from nanoseek.errors import NanoseekError


def _post_config(args: argparse.Namespace):
    from nanoseek.post.common import PostConfig

    return PostConfig(
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        save_every=args.save_every,
        grad_accum=getattr(args, "grad_accum", 1),
        precision=args.precision,
    )


def cmd_sft(args: argparse.Namespace) -> None:
    from nanoseek.post.sft import run_sft

    summary = run_sft(
        Path(args.base),
        Path(args.out),
        _post_config(args),
        Path(args.data) if args.data else None,
        args.task,
        args.task_examples,
        args.resume,
        pack=args.pack,
    )
    print(
        f"done: {args.out}  held-out loss {summary['val_loss']:.3f} on {summary['heldout_conversations']} "
        f"conversations ({summary['conversations']} trained on)"
    )


def cmd_rl(args: argparse.Namespace) -> None:
    from nanoseek.post.grpo import GrpoConfig, run_rl

    try:
        grpo = GrpoConfig(
            group_size=args.group_size,
            clip=args.clip,
            kl_beta=args.kl_beta,
            token_mean=args.token_mean,
            scale_by_std=not args.no_std_scaling,
            minibatches=args.minibatches,
            max_response_tokens=args.max_response_tokens,
            temperature=args.temperature,
        )
    except ValueError as e:
        raise NanoseekError(str(e)) from None
    summary = run_rl(
        Path(args.sft_run), Path(args.out), args.task, _post_config(args), grpo, args.resume, validation=args.validation
    )
    print(
        f"done: {args.out}  reward {summary['final_reward']:.3f}, training accuracy "
        f"{summary['final_accuracy']:.3f} (mean of the last 10 steps)"
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from nanoseek.post.evaluate import evaluate_bpb, evaluate_task

    if args.lm_eval:
        results = _harness().evaluate_harness(
            Path(args.model), args.lm_eval.split(","), args.include_path, args.limit, args.device, args.dtype
        )
        print(
            json.dumps(results, indent=2, default=str)
            if args.json
            else "\n".join(
                f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                for task, metrics in results.items()
            )
        )
        return
    device, dtype = resolve_device(args.device, args.dtype)
    try:
        if args.task == "bpb":
            result = evaluate_bpb(Path(args.model), args.data, args.n, device, dtype)
        else:
            result = evaluate_task(
                Path(args.model), args.task, args.n, args.seed, args.max_tokens, device, dtype, args.split
            )
    except ValueError as e:
        raise NanoseekError(str(e)) from None
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.task == "bpb":
        print(f"{args.model}: {result['bpb']:.4f} bits per byte over {result['bytes']:,} bytes of validation text")
    else:
        print(
            f"{args.model}: {args.task} pass@1 {result['accuracy']:.4f} ± {result['stderr']:.4f} "
            f"(greedy, {result['n']} {args.split} problems; layout followed in {100 * result['format_rate']:.1f} %)"
        )


def _harness():
    """nanoseek.post.harness, or one line saying lm-evaluation-harness is missing."""
    try:
        from nanoseek.post import harness
    except ImportError:
        raise NanoseekError("lm-evaluation-harness is not installed: pip install 'nanoseek[eval]'") from None
    return harness


def cmd_lm_eval(args: argparse.Namespace) -> None:
    _harness().lm_eval_cli(args.harness_args)


def _training_options(parser: argparse.ArgumentParser, steps: int, lr: float, batch: int) -> None:
    parser.add_argument("--out", required=True, help="output run directory (a model directory when done)")
    parser.add_argument("--max-steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--batch-size", type=int, default=batch)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="the training forward: auto = bf16 autocast on a GPU, fp32 on a CPU",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def register(commands: argparse._SubParsersAction) -> None:
    sft = commands.add_parser("sft", help="supervised fine-tuning on chat conversations (loss on assistant tokens)")
    sft.add_argument("base", help="a pretrained run or model directory")
    sft.add_argument(
        "--data",
        help='conversations, one {"messages": [...]} per line (default: the English dialogs of chatterbot-corpus)',
    )
    sft.add_argument(
        "--task",
        help="also train on worked examples of this task: arithmetic, multiplication, or "
        "module:Class for your own (see nanoseek.post.tasks.Task)",
    )
    sft.add_argument(
        "--task-examples", type=int, default=4000, help="how many distinct problems, from the task's sft split"
    )
    sft.add_argument("--pack", action="store_true", help="pack several conversations into a row (document mask)")
    sft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (same gradient, less memory)")
    _training_options(sft, steps=300, lr=1e-3, batch=32)
    sft.set_defaults(run=cmd_sft)

    rl = commands.add_parser("rl", help="GRPO reinforcement learning on a task with a rule-based reward")
    rl.add_argument("sft_run", help="the SFT run (or any model directory) to start from")
    rl.add_argument("--task", default="arithmetic", help="arithmetic, multiplication, or module:Class")
    rl.add_argument(
        "--validation",
        type=int,
        default=0,
        help="every --eval-every steps: pass@1 on this many validation problems, and the model saved "
        "under OUT/steps/STEP (to choose the step count on validation)",
    )
    rl.add_argument("--group-size", type=int, default=8, help="G: responses sampled per prompt")
    rl.add_argument("--clip", type=float, default=0.2, help="PPO's ε")
    rl.add_argument("--kl-beta", type=float, default=0.0, help="β of the KL penalty to the starting model")
    rl.add_argument("--token-mean", action="store_true", help="average the loss over all tokens (DAPO/Dr.GRPO)")
    rl.add_argument("--no-std-scaling", action="store_true", help="advantages not divided by the group's std")
    rl.add_argument("--minibatches", type=int, default=2, help="optimizer steps per batch of rollouts")
    rl.add_argument("--max-response-tokens", type=int, default=64)
    rl.add_argument("--temperature", type=float, default=1.0)
    _training_options(rl, steps=100, lr=1e-4, batch=16)
    rl.set_defaults(run=cmd_rl)

    ev = commands.add_parser("eval", help="pass@1 on a task's test (or validation) problems, or bits per byte")
    ev.add_argument("model", help="run or model directory")
    ev.add_argument("--task", default="arithmetic", help="a task name, module:Class, or bpb")
    ev.add_argument("--split", default="test", choices=("test", "validation"))
    ev.add_argument("--n", type=int, default=500, help="problems (bpb: validation windows at most)")
    ev.add_argument("--data", help="bpb: the corpus whose validation split is measured (default: the embedded one)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-tokens", type=int, default=64, help="longest response")
    ev.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="lm-evaluation-harness tasks (comma-separated) instead, run in process on nanoseek's engine",
    )
    ev.add_argument("--include-path", type=Path, help="--lm-eval: a folder of your own task YAMLs")
    ev.add_argument("--limit", type=int, help="--lm-eval: at most this many documents per task")
    ev.add_argument("--json", action="store_true")
    add_device_options(ev)
    ev.set_defaults(run=cmd_eval)

    harness = commands.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-evaluation-harness's own command line, with `--model nanoseek` registered "
        "(e.g. lm-eval run --model nanoseek --model_args pretrained=RUN --tasks T)",
    )
    harness.add_argument("harness_args", nargs=argparse.REMAINDER)
    harness.set_defaults(run=cmd_lm_eval)
