"""Post-training: the chat format against transformers, SFT's loss mask and data errors, the task's reward, GRPO's
loss on a hand-computed group, and the sft → rl → eval commands end to end on a tiny model."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

import nanoseek
from helpers import run_process_group, tiny_config
from nanoseek.cli import main
from nanoseek.data.chat_format import add_chat_tokens, encode_chat, write_chat_tokenizer_files
from nanoseek.data.tokenizer import end_token_ids, train_tokenizer
from nanoseek.infer.chat import ChatTemplate
from nanoseek.infer.sampler import RowSettings, probabilities
from nanoseek.post import grpo
from nanoseek.post.common import PostConfig, load_model_dir
from nanoseek.post.grpo import GrpoConfig, group_advantages, grpo_loss
from nanoseek.post.reward import Problem
from nanoseek.post.sft_data import EncodedConversations, batch, encode_all
from nanoseek.post.tasks import SPLITS, Arithmetic, Multiplication, TaskError, get_task, problems, split_of
from nanoseek.train.precision import autocast

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "<think>12 + 30</think> <answer>42</answer>"},
    {"role": "user", "content": "And 1 + 1?"},
]


PLUGIN = """
from nanoseek.post.reward import Problem, exact_answer_reward


class Parity:  # a user's task: a sampler over its whole space, a reward, a demonstration
    name = "parity"

    def sample(self, rng):
        n = rng.randint(0, 10**6)
        return Problem(f"Is {n} even?", "yes" if n % 2 == 0 else "no")

    def reward(self, problem, response):
        return exact_answer_reward(problem, response)

    def demonstration(self, problem):
        return f"<think>last digit</think> <answer>{problem.answer}</answer>"


class Tiny(Parity):
    name = "tiny"

    def sample(self, rng):  # 16 problems in all: about 2 in each eighth of the splits' hash
        return Problem(f"Is {rng.randint(0, 15)} even?", "yes")


class Incomplete:
    name = "incomplete"
"""


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(["What is 12 + 30? The answer is 42. Be brief, my lord; and again, and again. "] * 50, 200)
    add_chat_tokens(tok)
    return tok


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_renders_the_ids_transformers_renders(tmp_path, tokenizer, generation_prompt):
    import transformers

    write_chat_tokenizer_files(tokenizer, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    theirs = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
    ours, trained = encode_chat(tokenizer, MESSAGES, generation_prompt)
    assert theirs == ours
    served = tokenizer.encode(ChatTemplate(tmp_path).render(MESSAGES) if generation_prompt else "").ids
    if generation_prompt:  # the server renders the template and encodes the text: the same ids again
        assert served == ours
    assistant = tokenizer.encode("<think>12 + 30</think> <answer>42</answer>").ids
    assert [i for i, t in zip(ours, trained) if t] == assistant + [tokenizer.token_to_id("<｜end▁of▁sentence｜>")]


def test_sft_loss_falls_on_assistant_tokens_only(tokenizer):
    """A trailing user turn is context for no trained token, and its own tokens are never targets: changing it
    changes no gradient (beyond float rounding: the sequence length changes the kernels' blocking), while changing
    the assistant's answer does."""
    torch.manual_seed(0)
    model = nanoseek.build_model(tiny_config(vocab_size=tokenizer.get_vocab_size(), num_nextn_predict_layers=1))

    def gradients(last_user: str, answer: str = MESSAGES[2]["content"]) -> list[torch.Tensor]:
        messages = MESSAGES[:2] + [{"role": "assistant", "content": answer}, {"role": "user", "content": last_user}]
        ids, trained = encode_chat(tokenizer, messages)
        inputs, targets = batch(EncodedConversations([ids], [trained]), [0], pad_id=0)
        model.zero_grad()
        out = model(inputs, targets)
        (out.lm_loss + 0.3 * out.mtp_loss).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    first = gradients("And 1 + 1?")
    assert distance(first, gradients("Something else entirely, at length.")) < 1e-6
    assert distance(first, gradients("And 1 + 1?", answer="<think>12 + 30</think> <answer>41</answer>")) > 1e-3
    ids, trained = encode_chat(tokenizer, MESSAGES)
    _, targets = batch(EncodedConversations([ids], [trained]), [0], pad_id=0)
    assert (targets != -100).sum().item() == sum(trained)


@pytest.mark.parametrize(
    "line, needle",
    [
        ("{not json", "line 2: not JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant turn"),
        (
            '{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
            "line 2: messages[0] has the unknown role 'wizard'",
        ),
        (
            '{"messages": [{"role": "user", "content": "'
            + "hello " * 300
            + '"}, {"role": "assistant", "content": "x"}]}',
            "line 2: the conversation is",
        ),
        ('["a list"]', "line 2: expected"),
        ("[" * 100_000 + "]" * 100_000, "line 2: JSON nested too deeply"),
    ],
)
def test_bad_sft_data_gets_one_line_naming_the_line(tmp_path, capsys, tokenizer, line, needle):
    model_dir = tmp_path / "base"
    nanoseek.save_pretrained(nanoseek.build_model(tiny_config(vocab_size=tokenizer.get_vocab_size())), model_dir)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    (tmp_path / "data.jsonl").write_text("\n".join([good, line, good]) + "\n")
    code = main(
        [
            "sft",
            str(model_dir),
            "--data",
            str(tmp_path / "data.jsonl"),
            "--out",
            str(tmp_path / "sft"),
            "--max-steps",
            "1",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "sft" / "model.safetensors").exists()


def _chi_square(first: list, second: list) -> float:
    """Pearson's statistic for 'both samples come from one distribution' over the values they take."""
    values = sorted(set(first) | set(second))
    counts = [[sample.count(v) for v in values] for sample in (first, second)]
    total = len(first) + len(second)
    statistic = 0.0
    for sample, row in zip((first, second), counts):
        for c, observed in enumerate(row):
            expected = len(sample) * (counts[0][c] + counts[1][c]) / total
            statistic += (observed - expected) ** 2 / expected
    return statistic


def _features(problem: Problem) -> dict[str, object]:
    """What a biased split would skew: the operation, the answer's residues, whether the operands are equal mod 8."""
    a, op, b = problem.question.removeprefix("What is ").removesuffix("?").split()
    return {
        "op": op,
        "answer mod 8": int(problem.answer) % 8,
        "last digit": int(problem.answer) % 10,
        "a = b mod 8": (int(a) - int(b)) % 8 == 0,
    }


@pytest.mark.parametrize("task", [Arithmetic(), Multiplication()], ids=lambda t: t.name)
def test_splits_are_disjoint_unbiased_samples(task):
    """Every split is drawn from the task's one distribution: the answers' residues and the operations of the
    problems SFT trains on and of the test problems agree (χ² below its 0.01 % quantile), where the old split —
    held out iff (7919·a + 104729·b + [−]) mod 8 = 0 — fails by far: its held-out subtractions all have answers ≡ 1
    (mod 8) and its held-out sums are doublings."""
    drawn = {split: problems(task, split, 1200 if split == "sft" else 600, 0) for split in SPLITS}
    questions = {split: {p.question for p in found} for split, found in drawn.items()}
    assert all(len(q) == len(drawn[split]) for split, q in questions.items())  # distinct within a split
    assert all(not questions[x] & questions[y] for x in SPLITS for y in SPLITS if x < y)  # disjoint
    assert all(split_of(p) == split for split, found in drawn.items() for p in found)
    assert problems(task, "test", 600, 0) == drawn["test"] and problems(task, "test", 600, 1) != drawn["test"]
    assert all(task.reward(p, task.demonstration(p)).correct for p in drawn["test"])
    critical = {"op": 15.1, "answer mod 8": 29.9, "last digit": 33.7, "a = b mod 8": 15.1}  # df 1, 7, 9, 1
    for name, limit in critical.items():
        train_values = [_features(p)[name] for p in drawn["sft"]]
        test_values = [_features(p)[name] for p in drawn["test"]]
        assert _chi_square(train_values, test_values) < limit, name
    if task.name == "arithmetic":  # the check has teeth: the old rule's split fails it
        rng, old = random.Random(0), {True: [], False: []}
        while len(old[True]) < 600 or len(old[False]) < 1200:
            p = task.sample(rng)
            a, op, b = p.question.removeprefix("What is ").removesuffix("?").split()
            old[(int(a) * 7919 + int(b) * 104729 + (op == "-")) % 8 == 0].append(p)
        for name in ("answer mod 8", "a = b mod 8"):
            assert (
                _chi_square(
                    [_features(p)[name] for p in old[False][:1200]], [_features(p)[name] for p in old[True][:600]]
                )
                > 10 * critical[name]
            )


def test_rewards_and_task_plugins(tmp_path, monkeypatch):
    task = Arithmetic()
    problem = Problem("What is 40 + 2?", "42")
    assert task.reward(problem, "<think>40 + 2</think> <answer>42</answer>").value == 1.1
    wrong = task.reward(problem, "<think>40 + 2</think> <answer>41</answer>")
    assert (wrong.value, wrong.correct, wrong.formatted) == (0.1, False, True)
    for malformed in ("42", "<answer>42</answer>", "<think>x</think> <answer>42</answer> and more", ""):
        reward = task.reward(problem, malformed)
        assert reward.value == 0.0 and not reward.correct and not reward.formatted
    assert Multiplication().demonstration(Problem("What is 47 * 23?", "1081")) == (
        "<think>47*3: 7*3=21 4*3+2=14 → 141; 47*2: 7*2=14 4*2+1=9 → 940; 141+940: 1+0=1 4+4=8 1+9=10 0+0+1=1</think>"
        " <answer>1081</answer>"
    )
    (tmp_path / "my_tasks.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = get_task("my_tasks:Parity")
    assert plugin.name == "parity" and len(problems(plugin, "test", 5, 0)) == 5
    for name, needle in [
        ("nosuchtask", "unknown task 'nosuchtask'"),
        ("no_such_module:X", "cannot import"),
        ("my_tasks:Missing", "has no 'Missing'"),
        ("my_tasks:Incomplete", "lacks sample, reward"),
    ]:
        with pytest.raises(TaskError, match=needle):
            get_task(name)
    with pytest.raises(TaskError, match="distinct test problems"):
        problems(get_task("my_tasks:Tiny"), "test", 3, 0)


def test_grpo_loss_on_a_hand_computed_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    advantages = group_advantages(rewards, group_size=4)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    scaled = 0.5 / (std + 1e-4)
    assert advantages.tolist() == pytest.approx([scaled, -scaled, -scaled, scaled])
    assert group_advantages(rewards, 4, scale_by_std=False).tolist() == [0.5, -0.5, -0.5, 0.5]
    # two responses, two tokens each (the second response's second token is padding)
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.1], [0.5, 1.0]]))  # ratios 1.5 (clipped to 1.2), 1.1; 0.5 (to 0.8)
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -2.0])
    cfg = GrpoConfig(clip=0.2)
    loss, stats = grpo_loss(logp, old, adv, mask, cfg)
    # response 1: -min(1.5·1, 1.2·1) = -1.2 and -1.1 → mean -1.15; response 2: -min(0.5·-2, 0.8·-2) = 1.6
    assert loss.item() == pytest.approx((-1.15 + 1.6) / 2)
    # clipped, so without gradient: 1.5 with A > 0 and 0.5 with A < 0 (the ratio past ε in the advantage's direction)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    token_loss, _ = grpo_loss(logp, old, adv, mask, GrpoConfig(clip=0.2, token_mean=True))
    assert token_loss.item() == pytest.approx((-1.2 - 1.1 + 1.6) / 3)
    ref = torch.log(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    kl_loss, kl_stats = grpo_loss(logp, old, adv, mask, GrpoConfig(clip=0.2, kl_beta=0.1), ref)
    kls = [math.exp(-lp) + lp - 1 for lp in map(math.log, (1.5, 1.1, 0.5))]  # exp(ref - logp) - (ref - logp) - 1, ref 0
    assert kl_stats["kl"].item() == pytest.approx(sum(kls) / 3)
    assert kl_loss.item() == pytest.approx(((-1.2 + 0.1 * kls[0] - 1.1 + 0.1 * kls[1]) / 2 + 1.6 + 0.1 * kls[2]) / 2)


def _greedy_accuracy(model_dir, task, n: int, max_tokens: int) -> float:
    """What `nanoseek eval` should report, computed without the engine: greedy decoding by full forwards."""
    model, tokenizer = load_model_dir(model_dir, torch.device("cpu"))
    stops, correct = end_token_ids(tokenizer), 0
    for problem in problems(task, "test", n, 0):
        ids = encode_chat(tokenizer, [{"role": "user", "content": problem.question}], True)[0]
        generated: list[int] = []
        with torch.no_grad():
            for _ in range(max_tokens):
                token = int(model.eval()(torch.tensor([ids + generated]))[0, -1].argmax())
                if token in stops:
                    break
                generated.append(token)
        correct += task.reward(problem, tokenizer.decode(generated)).correct
    return correct / n


def test_sft_rl_eval_end_to_end(tmp_path, capsys, monkeypatch):
    """The commands on a tiny model: each writes a model directory (chat tokenizer included), RL logs its
    statistics and resumes, and eval reports accuracy and bits per byte as JSON."""
    base = tmp_path / "base"
    torch.manual_seed(0)
    plain = train_tokenizer(["What is 12 + 30? The answer is 42. Be brief, my lord; and again. "] * 50, 200)
    vocab = plain.get_vocab_size()
    # with an MTP module: SFT trains it, RL leaves it (and its optimizer state) alone, and RL still resumes
    nanoseek.save_pretrained(
        nanoseek.build_model(tiny_config(vocab_size=vocab, max_position_embeddings=128, num_nextn_predict_layers=1)),
        base,
    )
    plain.save(str(base / "tokenizer.json"))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": MESSAGES[1:3]}) + "\n" for _ in range(6)))
    assert (
        main(
            [
                "sft",
                str(base),
                "--data",
                str(chat),
                "--task",
                "arithmetic",
                "--task-examples",
                "40",
                "--out",
                str(tmp_path / "sft"),
                "--max-steps",
                "4",
                "--batch-size",
                "4",
                "--eval-every",
                "1",
            ]
        )
        == 0
    )
    sft_rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_rows] == [1, 2, 3, 4]
    assert sft_rows[-1]["val_loss"] < sft_rows[0]["val_loss"] - 0.1  # it learned the held-out conversations
    sft_config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert sft_config["vocab_size"] == vocab + 4  # the four chat markers were added, the embedding grown
    assert "chat_template" in json.loads((tmp_path / "sft" / "tokenizer_config.json").read_text())
    # a reward the random model meets in some samples only, so that GRPO's groups differ and the policy trains
    rl_args = [
        "rl",
        str(tmp_path / "sft"),
        "--out",
        str(tmp_path / "rl"),
        "--task",
        "helpers:EvenLength",
        "--batch-size",
        "2",
        "--group-size",
        "3",
        "--max-response-tokens",
        "6",
        "--save-every",
        "2",
        "--kl-beta",
        "0.05",
        "--validation",
        "4",
        "--eval-every",
        "2",
    ]
    assert main(rl_args + ["--max-steps", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"reward", "accuracy", "response_tokens", "kl", "clip_fraction", "trained_fraction"} <= set(rows[0])
    assert any(r["trained_fraction"] > 0 and r["entropy"] > 0 for r in rows)
    assert "val_accuracy" in rows[1] and (tmp_path / "rl" / "steps" / "000002" / "model.safetensors").exists()
    assert main(rl_args + ["--max-steps", "2"]) == 2  # the run exists: refused without --resume
    straight = rl_args[:3] + [str(tmp_path / "rl3")] + rl_args[4:]
    assert main(straight + ["--max-steps", "3"]) == 0
    interrupted = rl_args[:3] + [str(tmp_path / "rl2")] + rl_args[4:]
    real_rollout = grpo.rollout

    def preempted_rollout(model, tokenizer, task, step, *args):
        if step == 0:  # SIGTERM during the first step: it finishes, a checkpoint is written at step 1
            os.kill(os.getpid(), signal.SIGTERM)
        return real_rollout(model, tokenizer, task, step, *args)

    monkeypatch.setattr(grpo, "rollout", preempted_rollout)
    capsys.readouterr()
    assert main(interrupted + ["--max-steps", "3"]) == 75
    assert "stopped after step 1" in capsys.readouterr().err
    assert not (tmp_path / "rl2" / "model.safetensors").exists()
    monkeypatch.setattr(grpo, "rollout", real_rollout)
    assert main(interrupted + ["--max-steps", "3", "--resume"]) == 0
    resumed = [json.loads(line) for line in (tmp_path / "rl2" / "metrics.jsonl").read_text().splitlines()]
    uninterrupted = [json.loads(line) for line in (tmp_path / "rl3" / "metrics.jsonl").read_text().splitlines()]
    assert resumed == uninterrupted  # rewards, KL and clipping of every step, bit for bit
    capsys.readouterr()
    assert (
        main(
            ["eval", str(tmp_path / "rl2"), "--task", "helpers:EvenLength", "--n", "8", "--max-tokens", "12", "--json"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    expected = _greedy_accuracy(tmp_path / "rl2", get_task("helpers:EvenLength"), 8, 12)
    assert (result["split"], result["n"], result["accuracy"]) == ("test", 8, expected)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("What is 12 + 30? The answer is 42. Be brief, my lord; and again.\n" * 200)
    assert main(["eval", str(tmp_path / "rl2"), "--task", "bpb", "--data", str(corpus), "--json"]) == 0
    bpb = json.loads(capsys.readouterr().out)
    assert bpb["bpb"] == pytest.approx(_bits_per_byte(tmp_path / "rl2", corpus), rel=1e-5)


def _bits_per_byte(model_dir, corpus) -> float:
    """Bits per byte from its definition: the validation split (as prepared) cut into windows of the context (the
    last one shorter), each token but the first predicted once, its cross-entropy from the plain logits, in bits,
    over the UTF-8 bytes of the predicted tokens."""
    import torch.nn.functional as F

    from nanoseek.data.dataset import TokenDataset
    from nanoseek.data.sources import Source

    model, tokenizer = load_model_dir(model_dir, torch.device("cpu"), torch.float32)
    split = TokenDataset.build([Source(str(corpus))], tokenizer, progress=False).sources[0].val
    length, nats, size = model.config.max_position_embeddings, 0.0, 0
    for start in range(0, len(split) - 1, length):
        ids = torch.from_numpy(split.read(start, min(length, len(split) - 1 - start) + 1))
        with torch.no_grad():
            nats += F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="sum").item()
        size += len(tokenizer.decode(ids[1:].tolist()).encode())
    assert size > 0
    return nats / math.log(2) / size


def _policy() -> nanoseek.DeepseekV3Model:
    torch.manual_seed(0)
    return nanoseek.build_model(tiny_config(vocab_size=64)).train()


def test_grpo_log_probabilities_are_the_training_forwards_at_the_sampling_temperature():
    """In bf16, as GPUs train, the old log-probabilities recomputed by the training forward equal the trained ones
    bit for bit (the ratio is exactly 1 on the first minibatch), where fp32 rollout-time ones would differ by the
    precision gap; and every log-probability is of the tempered distribution the sampler draws from."""
    model, generator = _policy(), torch.Generator().manual_seed(1)
    inputs, targets = (torch.randint(0, 64, (4, 12), generator=generator) for _ in range(2))
    bf16 = PostConfig(max_steps=1, lr=1e-3, batch_size=4, precision="bf16").schedule()
    with autocast(torch.device("cpu"), bf16):
        with torch.no_grad():
            old, _ = grpo.token_logprobs(model, inputs, targets, 0.7)
        new, _ = grpo.token_logprobs(model, inputs, targets, 0.7)
    assert torch.equal(old, new) and new.requires_grad
    fp32, entropy = grpo.token_logprobs(model, inputs, targets, 0.7)
    assert (fp32 - new).abs().max() > 1e-3  # what a ratio against fp32 rollout log-probabilities would start at
    rows = RowSettings(
        torch.full((48,), 0.7),
        torch.zeros(48, dtype=torch.long),
        torch.ones(48),
        torch.zeros(48, dtype=torch.long),
        torch.zeros(48, dtype=torch.long),
        unfiltered=True,
    )
    with torch.no_grad():
        sampled = probabilities(model(inputs).flatten(0, 1), rows)
    assert torch.allclose(fp32.detach().flatten(), sampled.gather(1, targets.flatten()[:, None]).log()[:, 0], atol=1e-5)
    assert torch.allclose(entropy.flatten(), -(sampled * sampled.log()).sum(dim=-1), atol=1e-4)


def test_grpo_update_skips_uninformative_groups_and_starts_on_policy():
    model = _policy()
    cfg = PostConfig(max_steps=1, lr=1e-3, batch_size=2, precision="bf16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randint(0, 64, (6, 10), generator=generator)
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[:, 4:] = True
    batch = grpo.Rollouts(
        inputs,
        torch.roll(inputs, -1, 1),
        mask,
        torch.tensor([1.0, 0.0, 1.0, 0.1, 0.1, 0.1]),
        torch.tensor([1.0, 0, 1, 0, 0, 0]),
        torch.full((6,), 6.0),
    )
    assert grpo.informative_rows(batch.rewards, 3).tolist() == [0, 1, 2]  # the second group earned one reward
    before = [p.detach().clone() for p in model.parameters()]
    stats = grpo.policy_update(model, None, optimizer, batch, GrpoConfig(group_size=3, minibatches=1), cfg, 0)
    assert stats["clip_fraction"] == 0.0 and stats["trained_fraction"] == 0.5 and stats["entropy"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    flat = grpo.Rollouts(
        *(t[3:] for t in (batch.inputs, batch.targets, batch.mask, batch.rewards, batch.correct, batch.lengths))
    )
    after = [p.detach().clone() for p in model.parameters()]
    assert grpo.policy_update(model, None, optimizer, flat, GrpoConfig(group_size=3), cfg, 1) == {}
    assert all(torch.equal(a, b) for a, b in zip(after, model.parameters()))


def test_packed_and_accumulated_sft_steps_give_the_plain_steps_gradient(tokenizer):
    """Packing conversations into rows (with their document mask) and splitting a step into micro-batches change
    how a step is computed, not what: the same loss and gradient as one padded batch."""
    from nanoseek.post.sft import micro_batches, train_step

    conversations = [
        (
            str(i),
            [
                {"role": "user", "content": "What is 12 + 30?" * (1 + i % 3)},
                {"role": "assistant", "content": "The answer is 42." * (1 + i % 2)},
            ],
        )
        for i in range(6)
    ]
    data = encode_all(conversations, tokenizer, 128)
    model = nanoseek.build_model(tiny_config(vocab_size=tokenizer.get_vocab_size()))
    rows, pad = list(range(6)), end_token_ids(tokenizer)[-1]

    def step(grad_accum: int, width: int | None) -> tuple[float, list[torch.Tensor], int]:
        cfg = PostConfig(max_steps=1, lr=1e-3, batch_size=6, grad_accum=grad_accum)
        parts = micro_batches(data, rows, pad, cfg, width)
        model.zero_grad()
        loss, _ = train_step(model, parts, torch.device("cpu"), contextlib.nullcontext(), 0.0)
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None], sum(len(p[0]) for p in parts)

    plain_loss, plain_grads, plain_rows = step(1, None)
    for grad_accum, width in ((1, 128), (3, None), (2, 128)):
        loss, grads, used_rows = step(grad_accum, width)
        assert loss == pytest.approx(plain_loss, rel=1e-5), (grad_accum, width)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, plain_grads)), (grad_accum, width)
    assert step(1, 128)[2] < plain_rows  # packed: fewer rows


def _sft_inputs(tmp_path, tokenizer, conversations: int):
    """A random tiny base model with `tokenizer`, and a JSONL of `conversations` chats of a few lengths."""
    base = tmp_path / "base"
    torch.manual_seed(0)
    nanoseek.save_pretrained(nanoseek.build_model(tiny_config(vocab_size=tokenizer.get_vocab_size())), base)
    tokenizer.save(str(base / "tokenizer.json"))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "What is 12 + 30?" * (1 + i % 3) + f" ({i})"},
                        {"role": "assistant", "content": "The answer is 42, my lord." * (1 + i % 2)},
                    ]
                }
            )
            + "\n"
            for i in range(conversations)
        )
    )
    return base, chat


@pytest.mark.parametrize("steps", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_sft_under_torchrun_equals_one_process(tmp_path, tokenizer, steps):
    """Two data-parallel processes (FSDP2), each with its share of every step's conversations in two micro-batches,
    train the model one process trains (one step by default, three under `-m slow`)."""
    base, chat = _sft_inputs(tmp_path, tokenizer, 24)
    args = [
        "-m",
        "nanoseek",
        "sft",
        str(base),
        "--data",
        str(chat),
        "--max-steps",
        str(steps),
        "--batch-size",
        "8",
        "--grad-accum",
        "2",
        "--eval-every",
        str(steps),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPUs
    for out, launcher in (
        ("one", [sys.executable]),
        ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
    ):
        result = run_process_group(launcher + args + ["--out", str(tmp_path / out)], env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_file(tmp_path / out / "model.safetensors") for out in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)
    start = load_file(base / "model.safetensors")
    assert any(k in start and one[k].shape == start[k].shape and not torch.equal(one[k], start[k]) for k in one)
    rows = [
        [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        for out in ("one", "two")
    ]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-5)
    assert rows[0][-1]["val_loss"] == pytest.approx(rows[1][-1]["val_loss"], rel=1e-5)


def test_sft_pack_and_resume_through_the_cli(tmp_path, tokenizer):
    """`sft --pack` with checkpoints, cut back to its step-2 checkpoint (as a run preempted after it) and continued
    with `--resume`: steps 3 and 4 repeat the uninterrupted run's losses bit for bit, and the models are equal."""
    import shutil

    base, chat = _sft_inputs(tmp_path, tokenizer, 16)
    args = [
        "sft",
        str(base),
        "--data",
        str(chat),
        "--pack",
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--save-every",
        "2",
    ]
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in straight][-1] == 4
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "straight", cut)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step_0000002"]  # the last step: the model
    (cut / "model.safetensors").unlink()
    (cut / "metrics.jsonl").write_text(
        "".join(
            line + "\n"
            for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= 2
        )
    )
    assert main(args + ["--out", str(cut), "--resume"]) == 0
    resumed = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in straight]
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
