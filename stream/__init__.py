"""streamrec serving: Kafka I/O, RocksDB sessions, ONNX scoring, the processor loop, the CLI.

Nothing under stream/ imports torch or model/ (the CLI imports them lazily, inside the
subcommands that train or export).
"""

__version__ = "0.1.0"
