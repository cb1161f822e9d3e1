"""Data: sources, chat formatting with assistant-only masks, packing, mixing, Parquet shards, resumable loading."""

from loopfit.data.arithmetic import ArithmeticProblem, arithmetic_problem, arithmetic_problems
from loopfit.data.sources import Document, chat_messages, document_text, read_documents

__all__ = [
    "ArithmeticProblem",
    "Document",
    "arithmetic_problem",
    "arithmetic_problems",
    "chat_messages",
    "document_text",
    "read_documents",
]
