"""lm-evaluation-harness against `nanoseek serve` (its `local-completions` backend: echo, prompt logprobs, the
server's tokenizer endpoints) gets the same per-choice log-likelihoods and accuracy as its own `hf` backend on the
same model directory. Offline: a local multiple-choice task in YAML + JSONL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import micro_model_dir
from test_server import _start

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


def _lm_eval(workspace: Path, out: str, *model: str) -> tuple[dict, list[list[float]]]:
    """`lm_eval run` on the local task → (its results, each document's per-choice log-likelihoods)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(workspace / "hf")}
    result = subprocess.run([sys.executable, "-m", "lm_eval", "run", *model, "--include_path", str(workspace),
                             "--tasks", "nanoseek_choices", "--log_samples", "--output_path", str(workspace / out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next((workspace / out).rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next((workspace / out).rglob("samples_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    return results["results"]["nanoseek_choices"], [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval")
    micro_model_dir(root / "model", "User: hello there\nAssistant: good morrow, my lord\n" * 50, 300, 320)
    rows = [{"question": f"User: hello {i}. Assistant: good", "choices": [" morrow", " lord", " there", " hello"],
             "answer": i % 4} for i in range(12)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "task.yaml").write_text(TASK.format(data=root / "data.jsonl"))
    return root


def test_lm_eval_through_the_server_equals_its_hf_backend(workspace):
    hf_results, hf_scores = _lm_eval(workspace, "hf", "--model", "hf", "--model_args",
                                     f"pretrained={workspace / 'model'},dtype=float32", "--device", "cpu")
    process, base = _start(workspace / "model", api_key=None)
    try:
        served_results, served_scores = _lm_eval(
            workspace, "served", "--model", "local-completions", "--model_args",
            f"model=model,base_url={base}/v1/completions,num_concurrent=2,max_retries=1")
    finally:
        process.kill()
        process.wait()
    assert len(served_scores) == len(hf_scores) == 12
    for served, hf in zip(served_scores, hf_scores):
        assert served == pytest.approx(hf, abs=1e-5) and max(hf) < 0  # real scores, not zeros
    assert served_results["acc,none"] == hf_results["acc,none"]
