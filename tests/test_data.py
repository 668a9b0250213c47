"""Data: tokenizers, the built-in corpus, every file format, packing
boundaries, the token cache and the errors on bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

from centrifuge.data import ByteTokenizer, PackedDataset, corpus, load_dataset, load_tokenizer
from centrifuge.data.formats import RecordFormat, detect_format, iter_documents, resolve_files


def reference_rows(docs: list[list[int]], eos: int, pad: int, L: int, context=None):
    """Plain-Python packing, the semantics PackedDataset must match.
    context: for every document, how many of its first tokens (a prompt) have no label."""
    stream, doc_of, labelled = [], [], []
    for d, ids in enumerate(docs):
        if ids:
            stream += ids + [eos]
            doc_of += [d] * (len(ids) + 1)
            n = 0 if context is None else context[d]
            labelled += [False] * n + [True] * (len(ids) + 1 - n)
    rows = []
    for start in range(0, len(stream), L):
        ids, labels, pos = [], [], []
        for j in range(start, start + L):
            if j < len(stream):
                ids.append(stream[j])
                labels.append(stream[j] if labelled[j] else -100)
                new_doc = j == start or doc_of[j] != doc_of[j - 1]
                pos.append(0 if new_doc else pos[-1] + 1)
            else:
                ids.append(pad)
                labels.append(-100)
                pos.append(0 if j == len(stream) else pos[-1] + 1)
        rows.append((ids, labels, pos))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("L", [5, 16, 37])
def test_packing_matches_reference(tmp_path, seed, L):
    rng = np.random.default_rng(seed)
    texts = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(n)))
             for n in rng.integers(0, 40, 23)]  # fmt: skip  (some empty documents)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ds = load_dataset([str(f)], None, L, cache_dir=tmp_path / "cache")
    tok = ByteTokenizer()
    expected = reference_rows([tok.encode(t) for t in texts], tok.eos_id, tok.pad_id, L)
    assert len(ds) == len(expected)
    batch = ds.batch(range(len(ds)))
    for i, (ids, labels, pos) in enumerate(expected):
        assert batch["input_ids"][i].tolist() == ids
        assert batch["labels"][i].tolist() == labels
        assert batch["position_ids"][i].tolist() == pos
        row = ds[i]
        assert all(row[k].dtype == torch.long and row[k].shape == (L,) for k in row)
    # a shuffled, repeated selection gives the same rows
    idx = rng.integers(0, len(ds), 7)
    b2 = ds.batch(idx)
    assert torch.equal(b2["input_ids"], batch["input_ids"][idx])
    with pytest.raises(IndexError):
        ds.batch([len(ds)])


def test_packed_rows_make_document_boundaries_for_the_model(tmp_path):
    """The model sees one segment per document: attention never crosses them."""
    from centrifuge.plan import Layout

    f = tmp_path / "a.txt"
    f.write_text("hello")
    g = tmp_path / "b.txt"
    g.write_text("worlds!")
    ds = load_dataset([str(f), str(g)], None, 16, cache_dir=tmp_path / "c")
    b = ds.batch([0])
    layout = Layout.build(1, 16, "cpu", b["position_ids"])
    # "hello<eos>" | "worlds!<eos>" | 2 pads
    assert layout.segment_ids[0].tolist() == [0] * 6 + [1] * 8 + [2] * 2
    assert b["labels"][0, -2:].tolist() == [-100, -100]


def test_byte_tokenizer_roundtrip():
    tok = load_tokenizer(None)
    text = "Problem: 3 + 4 = 7. Ünïcödé ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 258 and tok.eos_id == 256 and tok.pad_id == 257
    assert tok.decode([72, 105, tok.eos_id]) == "Hi"


def test_saved_byte_tokenizer_is_the_byte_tokenizer(tmp_path):
    """The tokenizer.json a checkpoint carries encodes and decodes as the
    built-in tokenizer (random text and random bytes, invalid UTF-8 too), and
    reads back as it."""
    from tokenizers import Tokenizer

    ours = load_tokenizer(None)
    ours.save_pretrained(tmp_path)
    theirs = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng()
    alphabet = list(" \n\tabcXYZ019+=.,<>|") + ["é", "Ü", "✓", "中", "😀", "\x00", "\x7f"]
    for _ in range(20):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 40))))
        assert theirs.encode(text).ids == ours.encode(text)
        ids = rng.integers(0, 256, size=int(rng.integers(0, 30))).tolist()
        assert theirs.decode(ids) == ours.decode(ids)
    assert [theirs.token_to_id(t) for t in ("<|endoftext|>", "<pad>")] == [ours.eos_id, ours.pad_id]
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_saved_hf_tokenizer_keeps_its_identity(tmp_path):
    tok = load_tokenizer(_hf_tokenizer_dir(tmp_path))
    (tmp_path / "ckpt").mkdir()
    tok.save_pretrained(tmp_path / "ckpt")
    again = load_tokenizer(tmp_path / "ckpt")
    assert (again.identity, again.eos_id, again.pad_id) == (tok.identity, tok.eos_id, tok.pad_id)


def _hf_tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["one two three four five six", "seven eight nine ten"],
                           trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))  # fmt: skip
    d = tmp_path / "tok"
    d.mkdir()
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return d


def test_hf_tokenizer_directory(tmp_path):
    d = _hf_tokenizer_dir(tmp_path)
    tok = load_tokenizer(str(d))
    assert tok.eos_id == 1 and tok.vocab_size == 12
    ids = tok.encode("three one ten")
    assert len(ids) == 3 and tok.decode(ids) == "three one ten"
    f = tmp_path / "x.txt"
    f.write_text("one two three")
    ds = load_dataset([str(f)], tok, 8, cache_dir=tmp_path / "c")
    assert ds[0]["input_ids"][:4].tolist() == ids[:0] + tok.encode("one two three") + [1]
    other = load_dataset([str(f)], None, 8, cache_dir=tmp_path / "c")
    assert other.fingerprint != ds.fingerprint  # the tokenizer is part of the identity


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))


def _write_all_formats(tmp_path, texts):
    d = tmp_path / "txt"
    d.mkdir()
    for i, t in enumerate(texts):
        (d / f"doc{i:02d}.txt").write_text(t)
    return {"text dir": d, **_write_tables(tmp_path, {"text": texts})}


def _write_tables(tmp_path, columns: dict):
    """The same records (plus a numeric column) in every structured format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {**columns, "n": list(range(len(next(iter(columns.values())))))}
    records = [dict(zip(columns, row)) for row in zip(*columns.values())]
    out = {}
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    out["jsonl"] = f
    (tmp_path / "d.json").write_text(json.dumps(records, indent=1))
    out["json array"] = tmp_path / "d.json"
    table = pa.table(columns)
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    out["parquet"] = tmp_path / "d.parquet"
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=2)
    out["arrow file"] = tmp_path / "d.arrow"
    # datasets.save_to_disk layout: Arrow stream files listed in state.json
    sd = tmp_path / "saved"
    sd.mkdir()
    with pa.OSFile(str(sd / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as w:  # fmt: skip
        w.write_table(table, max_chunksize=3)
    (sd / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (sd / "dataset_info.json").write_text("{}")
    out["save_to_disk"] = sd
    dd = tmp_path / "saved_dict"
    dd.mkdir()
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    shutil.copytree(sd, dd / "train")
    out["save_to_disk dict"] = dd
    return out


def test_every_format_gives_the_same_documents(tmp_path):
    texts = [f"document {i}: " + "x" * i for i in range(7)]
    for name, path in _write_all_formats(tmp_path, texts).items():
        docs = [d for f in resolve_files([path]) for d in iter_documents(f)]
        assert docs == [[(t, True)] for t in texts], name
        ds = load_dataset([str(path)], None, 32, cache_dir=tmp_path / "cache")
        assert ds.n_tokens == sum(len(t) + 1 for t in texts), name


def test_token_cache_is_reused(tmp_path, monkeypatch):
    f = tmp_path / "d.txt"
    f.write_text("some text " * 50)
    calls = []
    tok = ByteTokenizer()
    orig = tok.encode_batch
    monkeypatch.setattr(tok, "encode_batch", lambda texts: calls.append(len(texts)) or orig(texts))
    a = load_dataset([str(f)], tok, 64, cache_dir=tmp_path / "c")
    b = load_dataset([str(f)], tok, 32, cache_dir=tmp_path / "c")  # other seq_len: same tokens
    assert len(calls) == 1
    assert a.cache_dir == b.cache_dir and (a.cache_dir / "tokens.bin").is_file()
    assert isinstance(a.tokens, np.memmap)
    assert a.fingerprint != b.fingerprint  # seq_len is part of the fingerprint
    f.write_text("other text " * 50)  # changed data: tokenized again, new fingerprint
    c = load_dataset([str(f)], tok, 64, cache_dir=tmp_path / "c")
    assert len(calls) == 2 and c.fingerprint != a.fingerprint


def test_interrupted_cache_build_leaves_no_entry(tmp_path, monkeypatch):
    f = tmp_path / "d.txt"
    f.write_text("abc")
    tok = ByteTokenizer()
    monkeypatch.setattr(tok, "encode_batch", lambda texts: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        load_dataset([str(f)], tok, 8, cache_dir=tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []
    assert len(load_dataset([str(f)], None, 8, cache_dir=tmp_path / "c")) == 1


def test_eval_split_holds_out_every_50th_document(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(120)))
    tr = load_dataset([str(f)], None, 16, cache_dir=tmp_path / "c")
    ev = load_dataset([str(f)], None, 16, split="eval", cache_dir=tmp_path / "c")
    assert tr.num_documents == 118 and ev.num_documents == 2
    assert ByteTokenizer().decode(ev[0]["input_ids"].tolist()).startswith("doc 49")
    small = tmp_path / "s.jsonl"
    small.write_text(json.dumps({"text": "one"}) + "\n")
    with pytest.raises(ValueError, match="held-out"):
        load_dataset([str(small)], None, 16, split="eval", cache_dir=tmp_path / "c")


def test_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset([str(tmp_path / "missing.jsonl")], None, 16, cache_dir=tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty after tokenization"):
        load_dataset([str(empty)], None, 16, cache_dir=tmp_path / "c")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_dataset([str(bad)], None, 16, cache_dir=tmp_path / "c")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"content": "ok"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        load_dataset([str(nofield)], None, 16, cache_dir=tmp_path / "c")
    assert load_dataset([str(nofield)], None, 16, cache_dir=tmp_path / "c", text_field="content")
    odd = tmp_path / "data.csv"
    odd.write_text("a,b")
    with pytest.raises(ValueError, match="unsupported type"):
        load_dataset([str(odd)], None, 16, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="seq_len"):
        load_dataset([str(nofield)], None, 1, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="split"):
        load_dataset([str(nofield)], None, 16, split="test", cache_dir=tmp_path / "c")


def _letters(rng, n: int) -> str:
    return "".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(n)))


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("L", [7, 32])
def test_prompt_completion_labels_only_the_completion(tmp_path, seed, L):
    """labels are -100 on exactly the prompt tokens (and padding); completion
    and eos keep theirs; documents are packed as text is, positions restarting
    at each one."""
    rng = np.random.default_rng(seed)
    recs = [{"prompt": _letters(rng, rng.integers(0, 30)), "completion": _letters(rng, rng.integers(0, 20))}
            for _ in range(23)]  # fmt: skip
    recs[3] = {"prompt": "", "completion": ""}  # no document at all
    recs[5]["completion"] = ""  # the eos is its only labelled token
    f = _jsonl(tmp_path / "sft.jsonl", recs)
    ds = load_dataset([f], None, L, cache_dir=tmp_path / "c")
    tok = ByteTokenizer()
    prompts = [tok.encode(r["prompt"]) for r in recs]
    expected = reference_rows([p + tok.encode(r["completion"]) for p, r in zip(prompts, recs)],
                              tok.eos_id, tok.pad_id, L, context=[len(p) for p in prompts])  # fmt: skip
    batch = ds.batch(range(len(ds)))
    assert len(ds) == len(expected) and ds.data_format == "prompt-completion"
    for i, (ids, labels, pos) in enumerate(expected):
        assert batch["input_ids"][i].tolist() == ids
        assert batch["labels"][i].tolist() == labels
        assert batch["position_ids"][i].tolist() == pos
    assert ds.context_tokens == sum(map(len, prompts))
    assert ds.real_tokens(range(len(ds))) == ds.n_tokens == sum(len(p) + len(r["completion"]) + 1
                                                                 for p, r in zip(prompts, recs) if p or r["completion"])  # fmt: skip


def test_prompt_completion_with_an_hf_tokenizer(tmp_path):
    """A document is tokens(prompt) + tokens(completion) + eos, each part encoded alone."""
    tok = load_tokenizer(_hf_tokenizer_dir(tmp_path))
    f = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "one two", "completion": "three four"},
                                        {"prompt": "five", "completion": "six"}])  # fmt: skip
    ds = load_dataset([f], tok, 16, cache_dir=tmp_path / "c")
    prompt = tok.encode("one two"), tok.encode("five")
    completion = tok.encode("three four"), tok.encode("six")
    assert [len(x) for x in prompt + completion] == [2, 1, 2, 1]
    eos, pad = tok.eos_id, tok.pad_id
    row = ds[0]
    assert row["input_ids"].tolist() == (prompt[0] + completion[0] + [eos] + prompt[1] + completion[1]
                                         + [eos] + [pad] * 8)  # fmt: skip
    assert row["labels"].tolist() == ([-100] * 2 + completion[0] + [eos] + [-100] + completion[1]
                                      + [eos] + [-100] * 8)  # fmt: skip
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2] + list(range(8))


def test_every_format_reads_prompt_completion_records(tmp_path):
    prompts = [f"question {i}? " for i in range(7)]
    completions = ["answer " + "y" * i for i in range(7)]
    texts = [p + c for p, c in zip(prompts, completions)]
    tables = _write_tables(tmp_path, {"text": texts, "prompt": prompts, "completion": completions})
    for name, path in tables.items():
        files = resolve_files([path])
        fmt = detect_format(files, RecordFormat())  # both forms present: prompt/completion wins
        assert fmt.kind == "prompt-completion", name
        docs = [d for f in files for d in iter_documents(f, fmt)]
        assert docs == [[(p, False), (c, True)] for p, c in zip(prompts, completions)], name
        ds = load_dataset([str(path)], None, 32, cache_dir=tmp_path / "cache")
        assert ds.context_tokens == sum(map(len, prompts)), name
        assert ds.n_tokens == sum(len(t) + 1 for t in texts), name
        as_text = load_dataset([str(path)], None, 32, cache_dir=tmp_path / "cache", data_format="text")
        assert as_text.context_tokens == 0 and as_text.n_tokens == ds.n_tokens, name
        assert (as_text.batch([0])["labels"] != -100).sum() > (ds.batch([0])["labels"] != -100).sum()
        assert as_text.fingerprint != ds.fingerprint, name


def test_prompt_completion_eval_split_holds_out_every_50th_record(tmp_path):
    recs = [{"prompt": f"q{i}:", "completion": f"a{i}"} for i in range(120)]
    f = _jsonl(tmp_path / "sft.jsonl", recs)
    tr = load_dataset([f], None, 16, cache_dir=tmp_path / "c")
    ev = load_dataset([f], None, 16, split="eval", cache_dir=tmp_path / "c")
    assert (tr.num_documents, ev.num_documents) == (118, 2)
    row = ev[0]
    assert ByteTokenizer().decode(row["input_ids"].tolist()).startswith("q49:a49")
    assert row["labels"][:9].tolist() == [-100] * 4 + list(b"a49") + [256, -100]


def test_record_format_errors(tmp_path):
    c = tmp_path / "c"

    def load(path, **kw):
        return load_dataset([path], None, 16, cache_dir=c, **kw)

    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "c"}])
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: no 'prompt' field \(found \['text'\]\); the "
                                         r"data holds prompt/completion records \(detected from .*mixed.jsonl:1\)"):
        load(mixed)
    sft = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    text = _jsonl(tmp_path / "text.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match=r"text.jsonl:1: no 'prompt' field"):  # across files too
        load_dataset([sft, text], None, 16, cache_dir=c)
    with pytest.raises(ValueError, match=r"sft.jsonl:1: no 'text' field.*holds text records"):
        load_dataset([text, sft], None, 16, cache_dir=c)
    half = _jsonl(tmp_path / "half.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(ValueError, match="half.jsonl:1: a 'prompt' field without a 'completion' field"):
        load(half)
    assert load(half, prompt_field="prompt", completion_field="answer").context_tokens == 1
    neither = _jsonl(tmp_path / "neither.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match=r"no 'text' field \(found \['question'\]\).*'prompt' and 'completion'"):
        load(neither)
    for value, kind in [(3, "int"), (None, "NoneType")]:
        bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": value}])
        with pytest.raises(ValueError, match=f"bad.jsonl:2: field 'completion' is not a string \\({kind}\\)"):
            load(bad)
    with pytest.raises(ValueError, match=r"text.jsonl:1: no 'prompt' field \(found \['text'\]\) \(data format"):
        load(text, data_format="prompt-completion")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a"], "reply": ["b"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t.parquet: no 'completion' column \(columns: \['prompt', 'reply'\]\)"):
        load(str(tmp_path / "t.parquet"), data_format="prompt-completion")
    with pytest.raises(ValueError, match="data format must be one of"):
        load(sft, data_format="chat")
    with pytest.raises(ValueError, match="must differ"):
        load(sft, completion_field="prompt")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]  # fmt: skip


@pytest.mark.parametrize("jinja_file", [False, True])
def test_messages_label_only_the_assistant_turns(tmp_path, chat_tokenizer, jinja_file):
    """Labels on an assistant turn's content and end-of-turn markup only: system
    and user turns and the assistant header (the generation prompt) are context."""
    tok = load_tokenizer(chat_tokenizer(CHATML, jinja_file=jinja_file))
    assert tok.chat_template == CHATML
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    ds = load_dataset([f], tok, 256, cache_dir=tmp_path / "c")
    assert ds.data_format == "messages"
    segments = [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                 "<|im_start|>assistant\n", False), ("Hello<|im_end|>\n", True),
                ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False), ("4<|im_end|>\n", True),
                ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False), ("Hello<|im_end|>\n", True)]  # fmt: skip
    ids, labels = [], []
    for i, (text, labelled) in enumerate(segments):
        part = tok.encode(text)
        ids += part
        labels += part if labelled else [-100] * len(part)
        if i in (3, 5):  # the end of a conversation: eos, labelled
            ids.append(tok.eos_id)
            labels.append(tok.eos_id)
    row = ds[0]
    assert row["input_ids"][: len(ids)].tolist() == ids
    assert row["labels"][: len(ids)].tolist() == labels
    assert ds.n_tokens == len(ids)
    changed = load_tokenizer(chat_tokenizer(CHATML.replace("\n{% endfor", "\n\n{% endfor")))
    assert load_dataset([f], changed, 256, cache_dir=tmp_path / "c").fingerprint != ds.fingerprint
    (tmp_path / "ckpt").mkdir()
    tok.save_pretrained(tmp_path / "ckpt")  # a checkpoint keeps the template
    assert load_tokenizer(tmp_path / "ckpt").chat_template == CHATML


def test_messages_in_a_table_and_their_errors(tmp_path, chat_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = load_tokenizer(chat_tokenizer(CHATML))
    c = tmp_path / "c"
    pq.write_table(pa.table({"messages": [CONVERSATION, CONVERSATION[1:3]]}), tmp_path / "chat.parquet")
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    from_table = load_dataset([str(tmp_path / "chat.parquet")], tok, 64, cache_dir=c)
    assert torch.equal(from_table.batch(range(len(from_table)))["labels"],
                       load_dataset([f], tok, 64, cache_dir=c).batch(range(len(from_table)))["labels"])
    with pytest.raises(ValueError, match="need a tokenizer with a chat template.*ByteTokenizer"):
        load_dataset([f], None, 64, cache_dir=c)
    for turns, match in [
        ([{"role": "user", "content": "Hi"}], "chat.jsonl:1: no assistant turn"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant"}], "chat.jsonl:1: turn 1 of 'messages' is not a"),
        ("Hi", "chat.jsonl:1: field 'messages' is not a non-empty list"),
    ]:  # fmt: skip
        f = _jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
        with pytest.raises(ValueError, match=match):
            load_dataset([f], tok, 64, cache_dir=c)
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    for template, match in [
        ("{% for m in messages %}{% if loop.last %}>{% endif %}{{ m['content'] }}{% endfor %}",
         r"renders turn 1 \(user\) by changing the text of the turns before it"),
        ("{{ raise_exception('roles must alternate') }}", "fails on this conversation .roles must alternate"),
    ]:  # fmt: skip
        bad = load_tokenizer(chat_tokenizer(template))
        with pytest.raises(ValueError, match=match):
            load_dataset([f], bad, 64, cache_dir=c)


def test_builtin_corpus_is_deterministic_and_noisy():
    a, b = corpus.documents("train", seed=3, n=50), corpus.documents("train", seed=3, n=50)
    assert a == b and a != corpus.documents("train", seed=4, n=50)
    text = "".join(a)
    clean = sum(len(p) for d in a for p in d.split("\n") if _is_clean_line(p))
    assert 0.15 < 1 - clean / len(text) < 0.6  # a real share of noise
    assert all(_is_clean_line(line) for d in corpus.documents("clean", 0, 20) for line in d.split("\n"))
    problems = corpus.heldout_problems(0, 40)
    assert [p.text for p in problems] == corpus.documents("eval", 0, 40)
    drills = 0
    for p in problems:  # answers are right: in the worked solution, or the drill's value
        assert p.prompt.endswith(corpus.ANSWER_PREFIX)
        if p.prompt.startswith("Problem: What is "):
            a, op, b = p.prompt.removeprefix("Problem: What is ").split("?")[0].split()
            assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))
            drills += 1
        else:
            assert f"= {p.answer}." in p.prompt
    assert 0 < drills < len(problems) // 2
    train_problems = {line for d in corpus.documents("train", 0) for line in d.split("\n")}
    word = [p for p in problems if "What is" not in p.prompt]
    assert len(word) > 10 and not any(p.prompt.split("\n")[0] in train_problems for p in word)


def test_word_problems_are_their_own_stream():
    """Task sets in other formats: word problems only, deterministic, none of the
    eval split's; question and solution rebuild the problem's prompt."""
    a = corpus.word_problems("instruction", 300)
    assert a == corpus.word_problems("instruction", 300) != corpus.word_problems("other", 300)
    assert a[:50] == corpus.word_problems("instruction", 50)
    held = {p.question for p in corpus.heldout_problems(0) if not p.is_drill}
    assert not any(p.is_drill for p in a) and not held & {p.question for p in a}
    for p in a + corpus.heldout_problems(0, 20):
        sol = f"Solution: {p.solution}\n" if p.solution else ""
        assert p.prompt == f"Problem: {p.question}\n{sol}{corpus.ANSWER_PREFIX}"
        assert p.is_drill == (p.solution == "")
    with pytest.raises(ValueError, match="split"):
        corpus.word_problems("eval", 3)


def _is_clean_line(line: str) -> bool:
    return line == "" or line.startswith(("Problem: ", "Solution: ", "Answer: "))


def test_builtin_dataset_splits(tmp_path):
    ds = load_dataset(None, None, 64, cache_dir=tmp_path)
    ev = load_dataset(None, None, 64, split="eval", cache_dir=tmp_path)
    assert ds.problems is None and len(ev.problems) == corpus.NUM_DOCS["eval"]
    assert ByteTokenizer().decode(ev[0]["input_ids"].tolist()).startswith(ev.problems[0].prompt[:60])
    again = load_dataset(None, None, 64, cache_dir=tmp_path)
    assert again.fingerprint == ds.fingerprint
    assert load_dataset(None, None, 64, cache_dir=tmp_path, seed=1).fingerprint != ds.fingerprint
    with pytest.raises(ValueError, match="split"):
        load_dataset(None, None, 64, split="validation", cache_dir=tmp_path)


class _NextTokenOracle(torch.nn.Module):
    """A stand-in model whose row t predicts input token t+1 (unless told to
    be wrong on some sequences): answer_accuracy must count exactly those."""

    def __init__(self, vocab, wrong: set):
        super().__init__()
        self.config = type("C", (), {"max_position_embeddings": 4096})()
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False)
        self.lm_head.weight.data = torch.eye(vocab)
        self.wrong, self.vocab = wrong, vocab
        self.calls = 0

    def forward(self, ids, attention_mask=None):
        nxt = torch.roll(ids, -1, dims=1)
        for i in range(ids.shape[0]):
            if self.calls * 1000 + i in self.wrong:
                last = int(attention_mask[i].sum()) - 2  # the row predicting the end marker
                nxt[i, last] = (nxt[i, last] + 1) % self.vocab
        self.calls += 1
        return type("O", (), {"hidden": torch.nn.functional.one_hot(nxt, self.vocab).float()})()


def test_answer_accuracy_counts_exact_answers():
    tok = ByteTokenizer()
    problems = corpus.heldout_problems(0, 10)
    assert corpus.answer_accuracy(_NextTokenOracle(258, set()), tok, problems, batch_size=4) == 1.0
    wrong = {1, 1003, 2001}  # one problem wrong in each batch of 4
    assert corpus.answer_accuracy(_NextTokenOracle(258, wrong), tok, problems, batch_size=4) == 0.7


def test_packed_dataset_repr_and_len(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("a" * 99)
    ds = load_dataset([str(f)], None, 10, cache_dir=tmp_path / "c")
    assert isinstance(ds, PackedDataset) and len(ds) == 10 and "10 rows" in repr(ds)
    assert ds[-1]["labels"].tolist() == [97] * 9 + [256]  # 99 bytes + eos fill 10 rows exactly
