"""The knowledge memory: an editable, searchable table of tokenised text entries.

``KnowledgeMemory`` (``store``) is the public object; the modules behind it each hold one
concern: ``tokenize`` (texts -> token tables), ``snapshot`` (one immutable version of the
tables and every read on it), ``encode`` (the length-grouped encode loop shared with the key
refresher), ``faiss_cache`` (cached approximate-search indexes kept in step with the
snapshots), ``files`` (the on-disk format), ``texts`` (entry texts as one byte blob plus
offsets) and ``build`` (a large memory streamed straight to disk). See docs/design.md,
"The memory".
"""
from .build import build_memory
from .files import FORMAT_NAME, FORMAT_VERSION, MemoryFormatError
from .snapshot import MemorySnapshot, TableLayout, ValidationReport
from .store import KnowledgeMemory
from .texts import TextTable

__all__ = ["KnowledgeMemory", "MemorySnapshot", "ValidationReport", "MemoryFormatError",
           "FORMAT_NAME", "FORMAT_VERSION", "TableLayout", "TextTable", "build_memory"]
