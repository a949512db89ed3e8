"""Property-based fuzzing (hypothesis, fixed seeds, bounded example counts) of the files a user hands over whole:
corpora, tokenizer files, model directories and training checkpoints. Each command either works or exits 2 with one
`nanoseek: error:` line; any other exception propagates out of `main` and fails the test with its traceback."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from hypothesis import event
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from helpers import cli_exit, fuzz, micro_model_dir
from nanoseek.cli import main
from nanoseek.data.chat_format import CHAT_TEMPLATE
from nanoseek.infer.chat import ChatTemplate

MICRO = [
    "model.hidden_size=32",
    "model.num_hidden_layers=1",
    "model.max_position_embeddings=32",
    "train.seq_len=8",
    "train.batch_size=2",
    "train.eval_batches=1",
    "train.vocab_size=260",
    "--max-steps",
    "1",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return micro_model_dir(
        tmp_path_factory.mktemp("model"), "to be or not to be, that is the question\n" * 40, 260, 264
    )


texts = st.text(max_size=400)
corpus_bytes = st.one_of(
    st.binary(max_size=2000),
    st.tuples(texts, st.sampled_from(["utf-8", "utf-16", "latin-1", "cp1252", "utf-32"])).map(
        lambda pair: pair[0].encode(pair[1], errors="replace")
    ),
    st.lists(json_values, max_size=20).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()),
    st.tuples(texts, st.binary(max_size=50)).map(lambda pair: (pair[0] * 20).encode() + pair[1]),  # a bad tail
)


def _packed(raw: bytes, suffix: str, data) -> bytes:
    """The bytes as the container of `suffix` would hold them: compressed whole, compressed then cut short, or
    raw bytes under a compressed or parquet name; a parquet file with a text column of any values."""
    import gzip

    import zstandard

    if suffix == ".jsonl.gz" and data.draw(st.booleans()):
        packed = gzip.compress(raw)
    elif suffix == ".jsonl.zst" and data.draw(st.booleans()):
        packed = zstandard.ZstdCompressor().compress(raw)
    elif suffix == ".parquet" and data.draw(st.booleans()):
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        values = data.draw(st.lists(st.none() | st.text(max_size=200), min_size=1, max_size=20))
        buffer = io.BytesIO()
        pq.write_table(pa.table({data.draw(st.sampled_from(["text", "body"])): values}), buffer)
        packed = buffer.getvalue()
    else:
        return raw
    return packed[: data.draw(st.integers(0, len(packed)))] if data.draw(st.booleans()) else packed


@fuzz(
    16,
    200,
    raw=corpus_bytes,
    suffix=st.sampled_from([".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"]),
    data=st.data(),
)
def test_corpora(tmp_path_factory, capsys, raw, suffix, data):
    directory = tmp_path_factory.mktemp("corpus")
    corpus = directory / f"corpus{suffix}"
    corpus.write_bytes(_packed(raw, suffix, data))
    code = cli_exit(capsys, "train", "--data", str(corpus), "--out", str(directory / "run"), *MICRO)
    assert (directory / "run" / "model.safetensors").exists() == (code == 0)


@fuzz(30, 250, data=st.data())
def test_tokenizer_json(tmp_path_factory, capsys, model_dir, data):
    """A tokenizer.json with random bytes, or its JSON with parts replaced by other values."""
    raw = json.loads((model_dir / "tokenizer.json").read_text())
    if data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(raw)))
        sub = raw[key]
        if isinstance(sub, dict) and sub and data.draw(st.booleans()):
            sub[data.draw(st.sampled_from(sorted(sub)))] = data.draw(json_values)
        else:
            raw[key] = data.draw(json_values)
        text = json.dumps(raw).encode()
    else:
        text = data.draw(st.binary(max_size=300))
    directory = tmp_path_factory.mktemp("tok")
    shutil.copytree(model_dir, directory / "m")
    (directory / "m" / "tokenizer.json").write_bytes(text)
    cli_exit(capsys, "generate", str(directory / "m"), "--prompt", "to be", "--max-new-tokens", "2")


@fuzz(
    60,
    400,
    raw=st.binary(max_size=200)
    | st.dictionaries(
        st.sampled_from(["chat_template", "bos_token", "eos_token", "x"]),
        json_values | st.just(CHAT_TEMPLATE) | st.text(alphabet="{}%#|-ab ", max_size=40),
    ).map(lambda d: json.dumps(d).encode()),
    messages=st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text(max_size=20)}
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_tokenizer_config_json(tmp_path_factory, raw, messages):
    """The chat template file the server and `chat` read: it loads and renders, or raises ValueError (which they
    report as one line or a 400)."""
    directory = tmp_path_factory.mktemp("tokcfg")
    (directory / "tokenizer_config.json").write_bytes(raw)
    try:
        text = ChatTemplate(directory).render(messages)
    except ValueError as e:
        assert str(e)
        event("ValueError")
    else:
        assert isinstance(text, str)


def _not_read(key: str) -> bool:
    """Tensors the loader may skip: V3's per-MTP-layer copies of the shared embedding and head."""
    return ".embed_tokens." in key and key.startswith("model.layers.") or ".shared_head.head." in key


def _mutate_safetensors(path, data) -> bool:
    """One of: truncate, flip header bytes, drop / reshape / retype a tensor, lie about the header length. True
    when the weights no longer fit their config, which a loader must refuse."""
    kind = data.draw(st.sampled_from(["truncate", "header", "drop", "reshape", "retype", "length"]))
    event(f"safetensors: {kind}")
    raw = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    if kind == "truncate":
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        return False  # a cut in the padding after the last tensor may leave every tensor whole
    if kind == "header":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(8, 8 + header_len - 1))] = data.draw(st.integers(0, 255))
        path.write_bytes(raw)
        return False  # a flipped byte may land in a name's padding, or make one float's dtype another
    if kind == "length":
        path.write_bytes(struct.pack("<Q", data.draw(st.integers(0, 1 << 64 - 1))) + raw[8:])
        return False
    tensors = load_file(str(path))
    key = data.draw(st.sampled_from(sorted(tensors)))
    before = tensors[key]
    if kind == "drop":
        del tensors[key]
    elif kind == "reshape":
        tensors[key] = torch.zeros(data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    else:
        tensors[key] = tensors[key].to(
            data.draw(st.sampled_from([torch.int32, torch.bool, torch.float16, torch.int8, torch.float64]))
        )
    save_file(tensors, str(path))
    changed = kind == "drop" or (
        tensors[key].shape != before.shape if kind == "reshape" else not tensors[key].dtype.is_floating_point
    )
    return changed and not _not_read(key)


# config fields whose change the weights' shapes contradict
SHAPE_FIELDS = [
    "hidden_size",
    "num_hidden_layers",
    "n_routed_experts",
    "kv_lora_rank",
    "vocab_size",
    "q_lora_rank",
    "qk_rope_head_dim",
    "moe_intermediate_size",
]


@fuzz(40, 400, data=st.data(), target=st.sampled_from(["weights", "config", "index"]))
def test_model_directories(tmp_path_factory, capsys, model_dir, data, target):
    directory = tmp_path_factory.mktemp("modeldir") / "m"
    shutil.copytree(model_dir, directory)
    must_refuse = False
    if target == "weights":
        must_refuse = _mutate_safetensors(directory / "model.safetensors", data)
    elif target == "config":  # a config that disagrees with its weights
        config = json.loads((directory / "config.json").read_text())
        name = data.draw(
            st.sampled_from(SHAPE_FIELDS + ["num_nextn_predict_layers", "model_type", "tie_word_embeddings"])
        )
        value = data.draw(st.integers(0, 300) | st.none() | st.booleans() | st.text(max_size=12))
        must_refuse = name in SHAPE_FIELDS and value != config.get(name)
        config[name] = value
        (directory / "config.json").write_text(json.dumps(config))
    else:  # an index whose shards are missing, or that points outside the directory
        names = list(load_file(str(directory / "model.safetensors")))
        shard = data.draw(
            st.sampled_from(["missing.safetensors", "../model.safetensors", "/etc/passwd", "", "model.safetensors"])
        )
        weight_map = {name: shard for name in names}
        body = data.draw(st.just({"weight_map": weight_map}) | json_values)
        (directory / "model.safetensors.index.json").write_text(json.dumps(body))
        if shard != "model.safetensors":
            (directory / "model.safetensors").rename(directory / "other.bin")
    code = cli_exit(capsys, "generate", str(directory), "--prompt", "to be", "--max-new-tokens", "2")
    event(f"must refuse: {must_refuse}")
    assert code == 2 or not must_refuse, "weights that do not fit their config were loaded"


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    """A two-step run with its checkpoint (the corpus next to it)."""
    directory = tmp_path_factory.mktemp("ckpt")
    (directory / "corpus.txt").write_text("to be or not to be, that is the question\n" * 300)
    assert (
        main(
            [
                "train",
                "--data",
                str(directory / "corpus.txt"),
                "--out",
                str(directory / "run"),
                *MICRO[:-2],
                "--max-steps",
                "2",
                "--save-every",
                "1",
            ]
        )
        == 0
    )
    (directory / "run" / "model.safetensors").unlink()  # as if preempted after its step-2 checkpoint
    return directory / "run"


@fuzz(20, 200, data=st.data(), command=st.sampled_from(["resume", "export"]))
def test_training_checkpoints(tmp_path_factory, capsys, training_run, data, command):
    """Damaged metadata (trainer.json), missing or truncated files, a damaged RNG file."""
    run = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(training_run, run)
    checkpoint = run / "checkpoints" / "step_0000002"
    files = sorted(p.name for p in checkpoint.iterdir())
    name = data.draw(st.sampled_from(files))
    kind = data.draw(st.sampled_from(["delete", "truncate", "bytes", "json"]))
    must_refuse = False
    event(f"{name}: {kind}")
    path = checkpoint / name
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        path.write_bytes(path.read_bytes()[: data.draw(st.integers(0, max(0, path.stat().st_size - 1)))])
    elif kind == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=100)))
    else:
        meta = json.loads((checkpoint / "trainer.json").read_text())
        key = data.draw(st.sampled_from(sorted(meta) + ["model.hidden_size", "train.seq_len"]))
        section, _, field = key.partition(".")
        value = data.draw(json_values | st.integers(-3, 100))
        if field and isinstance(meta.get(section), dict):
            must_refuse = key == "model.hidden_size" and value != meta[section].get(field)  # the weights' shape
            meta[section][field] = value
        else:
            meta[key] = value
        (checkpoint / "trainer.json").write_text(json.dumps(meta))
    if command == "resume":
        code = cli_exit(capsys, "train", "--out", str(run), "--resume", "--max-steps", "3")
    else:
        code = cli_exit(capsys, "export", str(checkpoint), str(run.parent / "exported"))
    assert code == 2 or not must_refuse, "a checkpoint whose trainer.json contradicts its weights was used"
    if code == 0 and command == "resume":
        assert (run / "model.safetensors").exists()
