"""Data: sources, chat formatting with assistant-only masks, packing, mixing, Parquet shards, resumable batches."""

from loopfit.data.arithmetic import ArithmeticProblem, arithmetic_problem, arithmetic_problems
from loopfit.data.chat import TokenizedDocument, tokenize_documents, tokenizer_hash
from loopfit.data.dataset import PackedData, PackedDataset, build_dataset, data_hash, parse_source
from loopfit.data.packing import IGNORE_INDEX, PackedRows, pack_documents
from loopfit.data.shards import load_prepared, save_prepared
from loopfit.data.sources import Document, chat_messages, document_text, read_documents
from loopfit.data.stream import BatchStream

__all__ = [
    "IGNORE_INDEX",
    "ArithmeticProblem",
    "BatchStream",
    "Document",
    "PackedData",
    "PackedDataset",
    "PackedRows",
    "TokenizedDocument",
    "arithmetic_problem",
    "arithmetic_problems",
    "build_dataset",
    "chat_messages",
    "data_hash",
    "document_text",
    "load_prepared",
    "pack_documents",
    "parse_source",
    "read_documents",
    "save_prepared",
    "tokenize_documents",
    "tokenizer_hash",
]
