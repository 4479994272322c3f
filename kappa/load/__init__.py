"""Getting a file onto the log exactly once: input formats, the loader, its ledger."""
