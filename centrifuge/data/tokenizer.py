"""Tokenizers: the built-in byte tokenizer and local Hugging Face tokenizers.

Every tokenizer offers ``encode(str) -> list[int]``, ``decode(list[int]) -> str``,
``vocab_size``, ``eos_id``, ``pad_id``, ``identity`` (a string that changes
whenever the token ids of a text could change; it keys the token cache and the
dataset fingerprint), and ``chat_template``: Hugging Face's Jinja chat template,
or None; where there is one, ``template_variables`` holds the special tokens'
strings a template may name (``bos_token``, ``eos_token``, ...).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")  # fmt: skip


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are bytes, 256 ends a document, 257 pads.

    Simple, deterministic and needs no files: the built-in default."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257
    eos_token = "<|endoftext|>"
    pad_token = "<pad>"
    identity = "centrifuge-byte-v1"
    name = "byte"
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` that
        ``transformers.AutoTokenizer`` loads with the same ids (byte-level BPE
        without merges: byte b is token b) and that :func:`load_tokenizer`
        reads back as this tokenizer."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        chars = _bytes_to_unicode()
        tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        # No regex split and no prefix space: the text's bytes, nothing added.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(self.eos_token, special=True),
                                AddedToken(self.pad_token, special=True)])  # fmt: skip
        path = Path(path)
        tok.save(str(path / "tokenizer.json"))
        config = dict(tokenizer_class="PreTrainedTokenizerFast", eos_token=self.eos_token,
                      pad_token=self.pad_token, centrifuge_tokenizer=self.identity)  # fmt: skip
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _bytes_to_unicode() -> dict[int, str]:
    """The table of the ByteLevel pre-tokenizer and decoder (GPT-2's): byte ->
    a printable character; printable bytes stand for themselves, the others
    take code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


class HFTokenizer:
    """A local Hugging Face tokenizer: a directory with tokenizer.json (and
    usually tokenizer_config.json), or a tokenizer.json file. Nothing is
    downloaded. Text is encoded without special tokens; documents are ended
    with the tokenizer's eos token by the packer."""

    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {path}: give a local Hugging Face tokenizer directory "
                "(Centrifuge downloads nothing)"
            )
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(file))
        self._file = file
        self.name = str(path)
        config = _config(file.parent)
        eos, pad = _special_tokens(config, self._tok)
        self.chat_template = _chat_template(file.parent, config)
        self.template_variables = {k: t for k in _TEMPLATE_TOKENS
                                   if (t := _token_string(config.get(k))) is not None}  # fmt: skip
        if eos is None:
            raise ValueError(
                f"tokenizer {path} defines no end-of-sequence token (eos_token in "
                "tokenizer_config.json, or a token such as </s> or <|endoftext|>): documents "
                "cannot be separated"
            )
        self.eos_id = eos
        self.pad_id = eos if pad is None else pad
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        digest = hashlib.sha256(file.read_bytes())
        self.identity = f"hf-{digest.hexdigest()[:24]}-eos{self.eos_id}"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save_pretrained(self, path: str | Path) -> None:
        """Copy the tokenizer's files into ``path`` (a checkpoint directory); a
        bare tokenizer.json gets a tokenizer_config.json naming its eos and pad
        tokens, so that ``AutoTokenizer`` finds them."""
        path = Path(path)
        shutil.copyfile(self._file, path / "tokenizer.json")
        for name in TOKENIZER_FILES[1:]:
            if (self._file.parent / name).is_file():
                shutil.copyfile(self._file.parent / name, path / name)
        if not (path / "tokenizer_config.json").is_file():
            config = dict(tokenizer_class="PreTrainedTokenizerFast",
                          eos_token=self._tok.id_to_token(self.eos_id),
                          pad_token=self._tok.id_to_token(self.pad_id))  # fmt: skip
            (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def _config(folder: Path) -> dict:
    cfg = folder / "tokenizer_config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else {}


def _token_string(entry) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or {"content": ...}."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _special_tokens(config: dict, tok) -> tuple[int | None, int | None]:
    """(eos_id, pad_id) from tokenizer_config.json, else well-known eos names."""
    def token_id(entry):
        text = _token_string(entry)
        return None if text is None else tok.token_to_id(text)

    eos, pad = token_id(config.get("eos_token")), token_id(config.get("pad_token"))
    if eos is None:
        eos = next((tok.token_to_id(t) for t in _EOS_CANDIDATES if tok.token_to_id(t) is not None),
                   None)  # fmt: skip
    return eos, pad


_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja (where transformers 5 saves it), else tokenizer_config.json's
    ``chat_template`` (its ``default`` entry where it holds named templates)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def load_tokenizer(name_or_dir: str | Path | None = None):
    """``None`` or ``"byte"``: the built-in byte tokenizer; otherwise a local
    Hugging Face tokenizer directory (or tokenizer.json file). A directory
    holding the byte tokenizer's own files (a checkpoint's) is the byte
    tokenizer again, so its token cache and dataset fingerprints stay the same."""
    if name_or_dir is None or str(name_or_dir) == "byte":
        return ByteTokenizer()
    path = Path(name_or_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer {str(name_or_dir)!r} not found: give 'byte' (built-in) or a local "
            "Hugging Face tokenizer directory"
        )
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            marker = json.loads(config.read_text()).get("centrifuge_tokenizer")
        except (ValueError, AttributeError):
            raise ValueError(f"{config} is not a JSON object") from None
        if marker == ByteTokenizer.identity:
            return ByteTokenizer()
    return HFTokenizer(path)
