"""Operator commands: the CLI, status, progress lines."""
