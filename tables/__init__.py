"""Table definitions: the state a pipeline keeps, and how it is laid out in RocksDB."""
