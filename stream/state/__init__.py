"""Per-user session state: the SessionStore protocol and its RocksDB implementation."""

from stream.state.store import RocksSessionStore, Session, SessionStore

__all__ = ["RocksSessionStore", "Session", "SessionStore"]
