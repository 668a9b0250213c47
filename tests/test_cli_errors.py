"""Every command as a new user meets it: bad input ends with one line naming the
problem and the file, a non-zero exit, no traceback and nothing written;
--debug and CENTRIFUGE_DEBUG show the traceback instead."""

import json

import pytest
import torch

from centrifuge.cli import main
from centrifuge.models import build_model, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    build_model(get_preset("tiny"), seed=0).save_pretrained(d / "model")
    truncated = d / "truncated"
    build_model(get_preset("tiny"), seed=0).save_pretrained(truncated)
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    (d / "empty_dir").mkdir()
    (d / "empty.jsonl").write_text("")
    (d / "garbage.jsonl").write_bytes(b'{"text": "fine"}\n\x00\xff\xfe garbage\n')
    (d / "nofield.jsonl").write_text(json.dumps({"body": "no text here"}) + "\n")
    (d / "text.parquet").write_text("plain text, not parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a document"] * 3}), d / "docs.parquet")
    (d / "dsdict").mkdir()
    (d / "dsdict" / "dataset_dict.json").write_text('{"splits": [')
    (d / "bad.yaml").write_text("steps: [1, 2\n  ratio: : :\n")
    (d / "bad.json").write_text('{"steps": 1,')
    (d / "typo.yaml").write_text("lrr: 0.01\n")
    (d / "afile").write_text("not a directory")
    from centrifuge.data import corpus

    docs = corpus.documents("train", 0, 60)  # 50 or more: one is held out
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return d


CUDA = [] if torch.cuda.is_available() else [
    (["eval", "{d}/model", "--device", "cuda"], "CUDA is not available"),
    (["score", "--model", "{d}/model", "--device", "cuda", "--out", "{d}/out"], "CUDA is not available"),
    (["bench", "--device", "cuda", "--out-dir", "{d}/out"], "CUDA is not available"),
]  # fmt: skip
MPS = [] if torch.backends.mps.is_available() else [
    (["train", "--device", "mps", "--out-dir", "{d}/out"], "MPS (Apple GPUs) is not available"),
    (["bench", "--device", "mps", "--out-dir", "{d}/out"], "MPS (Apple GPUs) is not available"),
]  # fmt: skip
# A training start on a small model and data: every check passes but the one named.
TRAIN = ["train", "--model", "tiny", "--data", "{d}/docs.jsonl", "--seq-len", "32", "--batch-size", "2",
         "--steps", "1", "--eval-rows", "2", "--out-dir", "{d}/out"]  # fmt: skip
BENCH = ["bench", "--model", "tiny", "--seq-len", "16", "--batch-size", "1", "--repeats", "1",
         "--warmup", "0", "--device", "cpu", "--no-hf", "--out-dir", "{d}/out"]  # fmt: skip


@pytest.mark.parametrize("argv, message", [
    (["eval", "{d}/missing"], "{d}/missing' does not exist"),
    (["eval", "{d}/truncated"], "{d}/truncated/model.safetensors"),
    (["eval", "{d}/empty_dir"], "{d}/empty_dir is not a checkpoint"),
    (["eval", "{d}/model", "--data", "{d}/empty.jsonl"], "no held-out documents in ['{d}/empty.jsonl']"),
    (["eval", "{d}/model", "--data", "{d}/garbage.jsonl"], "{d}/garbage.jsonl:2: not UTF-8 text"),
    (["eval", "{d}/model", "--data", "{d}/missing.jsonl"], "data path '{d}/missing.jsonl' does not exist"),
    (["eval", "{d}/model", "--data", "{d}/nofield.jsonl"], "{d}/nofield.jsonl:1: no 'text' field"),
    (["eval", "{d}/model", "--data", "{d}/text.parquet"], "{d}/text.parquet: not a readable parquet file"),
    (["eval", "{d}/model", "--json", "{d}/empty_dir"], "--json {d}/empty_dir is a directory"),
    (["eval", "{d}/model", "--data", "{d}/docs.parquet", "--text-field", "body"],
     "{d}/docs.parquet: no 'body' column (columns: ['text'])"),
    (["eval", "{d}/model", "--data", "{d}/dsdict"], "{d}/dsdict/dataset_dict.json: not valid JSON"),
    (["score", "--model", "{d}/truncated", "--out", "{d}/out"], "{d}/truncated/model.safetensors"),
    (["score", "--model", "{d}/model", "--data", "{d}/garbage.jsonl", "--out", "{d}/out"],
     "{d}/garbage.jsonl:2: not UTF-8 text"),
    (["score", "--model", "{d}/model", "--seq-len", "2000", "--out", "{d}/out"],
     "rows of 2000 tokens are longer than the reference model supports"),
    (["train", "--config", "{d}/bad.yaml", "--out-dir", "{d}/out"], "config file {d}/bad.yaml is not valid YAML"),
    (["train", "--config", "{d}/bad.json", "--out-dir", "{d}/out"], "config file {d}/bad.json is not valid JSON"),
    (["train", "--data", "{d}/garbage.jsonl", "--select", "none", "--out-dir", "{d}/out"],
     "{d}/garbage.jsonl:2: not UTF-8 text"),
    (["train", "--data", "{d}/text.parquet", "--select", "none", "--out-dir", "{d}/out"],
     "{d}/text.parquet: not a readable parquet file"),
    # Every check comes before the first write: a failed start leaves no options.json
    # or metrics.jsonl behind (which would refuse the corrected command).
    ([*TRAIN, "--select", "rho1"], "selection 'rho1' needs a reference"),
    ([*TRAIN, "--reference", "{d}/missing"], "reference model '{d}/missing' does not exist"),
    ([*TRAIN, "--reference-scores", "{d}/missing"], "no reference-score store at {d}/missing"),
    ([*TRAIN, "--select", "loss", "--exact-layers", "99"], "exact_layers=99 exceeds the model's 2 layers"),
    ([*TRAIN, "--select", "loss", "--exact-top", "2", "--exact-layers", "1"],
     "exact_layers=1 and exact_top=2 overlap in the model's 2 layers"),
    ([*TRAIN, "--select", "loss", "--parallel", "ddp"], "parallel 'ddp' needs several processes"),
    ([*TRAIN, "--select", "none", "--backward-extra", "0.3"], "select 'none' filters none"),
    ([*TRAIN, "--select", "loss", "--model", "{d}/truncated", "--tokenizer", "byte"],
     "{d}/truncated/model.safetensors"),
    (["train", "--batch-size", "1000000", "--out-dir", "{d}/out"],
     "a micro-batch of 1000000 rows x 256 tokens of mini needs at least about"),
    (["train", "--config", "{d}/typo.yaml", "--out-dir", "{d}/out"],
     "config file {d}/typo.yaml: unknown training option(s) 'lrr' (did you mean 'lr'?)"),
    ([*BENCH, "--seq-len", "0"], "seq-len must be at least 2, got 0"),
    ([*BENCH, "--repeats", "0"], "repeats must be at least 1, got 0"),
    ([*BENCH, "--layers", "0"], "layers must lie in 1..2 (the tiny preset's layers), got 0"),
    ([*BENCH, "--layers", "3"], "layers must lie in 1..2 (the tiny preset's layers), got 3"),
    ([*BENCH, "--liger"], "--liger needs a CUDA device"),
    (["score", "--model", "{d}/model", "--data", "{d}/docs.jsonl", "--seq-len", "32", "--out", "{d}/afile"],
     "the score store {d}/afile is a file"),
    *CUDA,
    *MPS,
])  # fmt: skip
def test_bad_input_is_one_line_naming_the_file(files, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("CENTRIFUGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CENTRIFUGE_DEBUG", raising=False)
    argv = [a.format(d=files) for a in argv]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"centrifuge {argv[0]}: error: ")
    assert message.format(d=files) in err
    assert "Traceback" not in out + err and out == ""
    assert not (files / "out").exists()  # nothing written


def test_argument_values_are_checked(files, capsys):
    for argv in (["eval", str(files / "model"), "--seq-len", "0"],
                 ["eval", str(files / "model"), "--max-rows", "0"],
                 ["score", "--model", str(files / "model"), "--batch-size", "-1"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "must be at least" in capsys.readouterr().err


def test_debug_shows_the_traceback_and_bugs_stay_one_line(files, capsys, monkeypatch):
    monkeypatch.delenv("CENTRIFUGE_DEBUG", raising=False)
    missing = str(files / "missing")
    with pytest.raises(FileNotFoundError):
        main(["eval", missing, "--debug"])
    monkeypatch.setenv("CENTRIFUGE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["eval", missing])
    monkeypatch.delenv("CENTRIFUGE_DEBUG")

    import centrifuge.evaluation.cli as eval_cli

    def bug(args):
        raise KeyError("oops")

    monkeypatch.setattr(eval_cli, "run", bug)
    assert main(["eval", missing]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "--debug" in err
