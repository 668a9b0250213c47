"""Data: the built-in default corpus, tokenizers, file formats, packing into
fixed-length rows and the memory-mapped token cache.

    tok = load_tokenizer(None)                       # built-in byte tokenizer
    ds = load_dataset(None, tok, seq_len=256)        # built-in corpus, train split
    batch = ds.batch([0, 1, 2])                      # input_ids/labels/position_ids [3, 256]
"""

from centrifuge.data import corpus
from centrifuge.data.dataset import load_dataset
from centrifuge.data.packed import IGNORE_INDEX, PackedDataset
from centrifuge.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["corpus", "load_dataset", "load_tokenizer", "PackedDataset", "ByteTokenizer",
           "HFTokenizer", "IGNORE_INDEX"]  # fmt: skip
