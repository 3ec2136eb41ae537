"""Document KV sources: in memory (:class:`MemoryKV`) or on disk (:class:`DiskKV`)."""

from lens.runtime.kv.source import KVSource

__all__ = ["KVSource"]
