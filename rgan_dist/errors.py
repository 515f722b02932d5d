"""Errors that the CLI turns into one actionable line and exit code 2 (never a traceback)."""


class UsageError(Exception):
    """Bad user input: a config value, a path, a CLI argument. The message is the whole story."""


class ConfigError(UsageError):
    """A config key or value is unknown, mistyped or out of range."""
