"""Data: the corpus, the tokenizer, pre-tokenized shards and the rank-aware, resumable loader."""

from distrib.data.loader import Batch, TokenLoader, build_loaders, document_ids
from distrib.data.prepare import prepare_dataset
from distrib.data.shards import ShardWriter, TokenShards, token_dtype, write_token_dataset
from distrib.data.sources import Corpus, iter_documents, load_corpus
from distrib.data.tokenizer import EOS_TOKEN, Tokenizer, train_bpe
from distrib.data.verify import verify_dataset

__all__ = [
    "EOS_TOKEN",
    "Batch",
    "Corpus",
    "ShardWriter",
    "TokenLoader",
    "TokenShards",
    "Tokenizer",
    "build_loaders",
    "document_ids",
    "iter_documents",
    "load_corpus",
    "prepare_dataset",
    "token_dtype",
    "train_bpe",
    "verify_dataset",
    "write_token_dataset",
]
