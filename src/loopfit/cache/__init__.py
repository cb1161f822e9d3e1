"""Offline teacher cache: run the teacher once over the training rows, store sparse targets, train without it.

Format and rationale: docs/cache.md. Training side: `TeacherCache(folder)`, `.check_compatible(tokenizer_hash,
data_hash, temperature)`, `cache[i] -> {"ids", "values", "tail"?}`, or `TeacherTargetsDataset(dataset, cache)`.
Writing side: `build_teacher_cache(teacher, data, out, CacheSettings(...))` (what `loopfit cache-teacher` runs).
"""

from loopfit.cache.build import build_teacher_cache
from loopfit.cache.reader import TeacherCache, TeacherTargetsDataset
from loopfit.cache.writer import CacheSettings, sparse_targets, target_positions, write_cache

__all__ = [
    "CacheSettings",
    "TeacherCache",
    "TeacherTargetsDataset",
    "build_teacher_cache",
    "sparse_targets",
    "target_positions",
    "write_cache",
]
