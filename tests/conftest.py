"""Shared test set-up.

Triton kernels run under Triton's CPU interpreter when no GPU is present, so
the normal (CPU) suite holds every kernel to its reference. The interpreter is
chosen by an environment variable that Triton reads when it is first imported,
so it must be set here, before any test module imports triton.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite's models are tiny, where BackwardOptions' path "auto" would pick the
# dense path on a GPU; the GPU tests hold the compact kernels to the reference,
# so auto means compact there too (and in the processes tests launch).
# tests/test_backward_path.py covers the dense path and the choice itself.
os.environ["CENTRIFUGE_COMPACT_MIN_WORK"] = "0"


def _fix_interpreter_scalar_index():
    """Triton 3.6's interpreter holds a scalar as a one-element array and turns
    it into a Python int with int(array), which NumPy >= 2.4 refuses
    (triton-lang/triton#9171). A kernel whose loop bound is loaded from memory
    then fails under the interpreter only. Re-patch tensor.__index__ to take the
    single element explicitly."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_centrifuge_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._centrifuge_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_scalar_index()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds contention on a shared CPU
    (opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """A small JSONL corpus: the built-in corpus' noisy training documents."""
    import json

    from centrifuge.data import corpus

    f = tmp_path_factory.mktemp("data") / "train.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.documents("train", 0, 120)))
    return f


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    """Prompt/completion records: a problem's question, then its worked solution and answer."""
    import json

    from centrifuge.data import corpus

    recs = []
    for p in corpus.heldout_problems(3, 150):
        question, rest = p.text.split("\n", 1)
        recs.append({"prompt": question + "\n", "completion": rest})
    f = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return f


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A token cache shared by the tests that train on ``data_file``."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def chat_tokenizer(tmp_path_factory):
    """make(template, jinja_file=False) -> a tokenizer directory: bytes plus
    <|im_start|> and <|im_end|>, with the chat template in tokenizer_config.json
    (or in chat_template.jinja, where transformers 5 saves it)."""
    import json

    from tokenizers import AddedToken, Tokenizer

    from centrifuge.data import ByteTokenizer

    def make(template: str, jinja_file: bool = False):
        d = tmp_path_factory.mktemp("chat_tokenizer")
        ByteTokenizer().save_pretrained(d)
        tk = Tokenizer.from_file(str(d / "tokenizer.json"))
        tk.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
        tk.save(str(d / "tokenizer.json"))
        config = json.loads((d / "tokenizer_config.json").read_text())
        del config["centrifuge_tokenizer"]  # an HF tokenizer now, not the built-in one
        if jinja_file:
            (d / "chat_template.jinja").write_text(template)
        else:
            config["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        return d

    return make


@pytest.fixture
def load_script(monkeypatch):
    """``load_script("name")`` imports scripts/name.py as the module ``name`` (the
    scripts are no package), registered in sys.modules for the test only (their
    dataclasses look their module up there)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mod)
        spec.loader.exec_module(mod)
        return mod

    return load
