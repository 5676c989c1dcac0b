"""The run config: its checks, the shared schema and the resume check (shared layer)."""
