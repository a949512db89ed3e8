"""lm-evaluation-harness against `nanoseek serve` (its `local-completions` backend: echo, prompt logprobs, the
server's tokenizer endpoints) and on nanoseek's engine in process (the `nanoseek` model class, through
`nanoseek lm-eval` and `nanoseek eval --lm-eval`) gets the per-choice log-likelihoods and accuracy of the model's
own forward (and of lm_eval's own `hf` backend: the slow test). Offline: a local multiple-choice task in YAML +
JSONL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_server import _start

from helpers import micro_model_dir

TASK = """task: nanoseek_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _lm_eval(
    workspace: Path, out: str, *model: str, harness: tuple[str, ...] = ("lm_eval",)
) -> tuple[dict, list[list[float]]]:
    """`lm_eval run` (or `nanoseek lm-eval run`) on the local task → (its results, each document's per-choice
    log-likelihoods)."""
    env = {**os.environ, **OFFLINE, "HF_HOME": str(workspace / "hf")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            *harness,
            "run",
            *model,
            "--include_path",
            str(workspace),
            "--tasks",
            "nanoseek_choices",
            "--log_samples",
            "--output_path",
            str(workspace / out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next((workspace / out).rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next((workspace / out).rglob("samples_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    return results["results"]["nanoseek_choices"], [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval")
    micro_model_dir(root / "model", "User: hello there\nAssistant: good morrow, my lord\n" * 50, 300, 320)
    rows = [
        {
            "question": f"User: hello {i}. Assistant: good",
            "choices": [" morrow", " lord", " there", " hello"],
            "answer": i % 4,
        }
        for i in range(12)
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "task.yaml").write_text(TASK.format(data=root / "data.jsonl"))
    return root


def test_lm_eval_through_the_server_equals_the_models_own_loglikelihoods(workspace):
    """lm_eval's `local-completions` backend against `nanoseek serve`: each choice's score is the model's own forward
    within 1e-5, and the accuracy the one those scores give. (The model's forward equals transformers', and lm_eval's
    `hf` backend agrees with it on this task: the slow test below.)"""
    process, base = _start(workspace / "model", api_key=None)
    try:
        served_results, served_scores = _lm_eval(
            workspace,
            "served",
            "--model",
            "local-completions",
            "--model_args",
            f"model=model,base_url={base}/v1/completions,num_concurrent=2,max_retries=1",
        )
    finally:
        process.kill()
        process.wait()
    expected = _own_loglikelihoods(workspace / "model", _rows(workspace))
    assert len(served_scores) == len(expected) == 12
    for served, own in zip(served_scores, expected):
        assert served == pytest.approx(own, abs=1e-5) and max(own) < 0  # real scores, not zeros
    assert served_results["acc,none"] == pytest.approx(_accuracy(expected, _rows(workspace)))


def _rows(workspace: Path) -> list[dict]:
    return [json.loads(line) for line in (workspace / "data.jsonl").read_text().splitlines()]


def _accuracy(scores: list[list[float]], rows: list[dict]) -> float:
    return sum(max(range(len(s)), key=s.__getitem__) == row["answer"] for s, row in zip(scores, rows)) / len(rows)


def _own_loglikelihoods(model_dir: Path, rows: list[dict]) -> list[list[float]]:
    """Each choice's log-likelihood after its question by the model's plain forward (no engine, no harness)."""
    import torch

    import nanoseek
    from nanoseek.data.tokenizer import load_tokenizer

    model, tokenizer = nanoseek.load_pretrained(model_dir).eval(), load_tokenizer(model_dir / "tokenizer.json")
    scores = []
    for row in rows:
        context = tokenizer.encode(row["question"], add_special_tokens=False).ids
        per_choice = []
        for choice in row["choices"]:
            whole = tokenizer.encode(row["question"] + " " + choice, add_special_tokens=False).ids
            with torch.no_grad():
                logp = model(torch.tensor([whole]))[0].float().log_softmax(-1)
            per_choice.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        scores.append(per_choice)
    return scores


def test_lm_eval_on_the_engine_equals_the_models_own_loglikelihoods(workspace):
    """The `nanoseek` lm-eval model (registered under that name) scores each choice as the model's own forward
    does, within 1e-5; `nanoseek eval --lm-eval` runs the local task in process and reports the accuracy those
    scores give."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from nanoseek.post.harness import NanoseekLM

    assert get_model("nanoseek") is NanoseekLM and get_model("hf").__name__ == "HFLM"
    rows = _rows(workspace)
    expected = _own_loglikelihoods(workspace / "model", rows)
    lm = NanoseekLM(str(workspace / "model"), max_seqs=4)
    requests = [
        Instance("loglikelihood", row, (row["question"], " " + choice), i)
        for row in rows
        for i, choice in enumerate(row["choices"])
    ]
    # the reference's cut between context and continuation is lm_eval's own (TemplateLM._encode_pair), trailing
    # spaces of a context moved to its continuation included
    from nanoseek.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(workspace / "model" / "tokenizer.json")
    for context, continuation in [r.args for r in requests] + [("What is it? ", "Nothing")]:
        whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
        cut = len(tokenizer.encode(context.rstrip(), add_special_tokens=False).ids)
        assert lm._encode_pair(context, continuation) == (whole[:cut], whole[cut:])
    scored = [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    assert scored == pytest.approx([s for per_choice in expected for s in per_choice], abs=1e-5)
    accuracy = _accuracy(expected, rows)
    env = {**os.environ, **OFFLINE, "HF_HOME": str(workspace / "hf")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanoseek",
            "eval",
            str(workspace / "model"),
            "--lm-eval",
            "nanoseek_choices",
            "--include-path",
            str(workspace),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["nanoseek_choices"]["acc,none"] == pytest.approx(accuracy)


@pytest.mark.slow
def test_lm_evals_own_command_line_runs_the_nanoseek_model(workspace):
    """`nanoseek lm-eval run --model nanoseek ...` is lm_eval's CLI with the model registered: the same per-choice
    log-likelihoods and accuracy as its `hf` backend."""
    hf_results, hf_scores = _lm_eval(
        workspace,
        "hf-cli",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={workspace / 'model'},dtype=float32",
        "--device",
        "cpu",
    )
    results, scores = _lm_eval(
        workspace,
        "engine",
        "--model",
        "nanoseek",
        "--model_args",
        f"pretrained={workspace / 'model'},max_seqs=4",
        harness=("nanoseek", "lm-eval"),
    )
    assert len(scores) == len(hf_scores) == 12
    assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(scores, hf_scores))
    assert results["acc,none"] == hf_results["acc,none"]
