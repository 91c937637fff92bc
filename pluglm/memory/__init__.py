"""The knowledge memory: an editable, searchable table of tokenised text entries.

``KnowledgeMemory`` (``store``) is the public object; the modules behind it each hold one
concern: ``tokenize`` (texts -> token tables), ``snapshot`` (one immutable version of the
tables and every read on it), ``encode`` (the length-grouped encode loop shared with the key
refresher), ``faiss_cache`` (cached approximate-search indexes kept in step with the
snapshots) and ``files`` (the on-disk format). See docs/design.md, "The memory".
"""
from .files import FORMAT_NAME, FORMAT_VERSION, MemoryFormatError
from .snapshot import MemorySnapshot, ValidationReport
from .store import KnowledgeMemory

__all__ = ["KnowledgeMemory", "MemorySnapshot", "ValidationReport", "MemoryFormatError",
           "FORMAT_NAME", "FORMAT_VERSION"]
