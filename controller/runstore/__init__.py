"""The run folder: its lock, ledger of typed records, field store, audit log."""
