"""The one error type for bad user input: `<file>: <field>: <problem>; allowed: <…>`."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input, reported as one line and exit code 2 by the CLI."""

    def __init__(self, source: str, field: str, problem: str, allowed: str | None = None):
        self.source, self.field, self.problem, self.allowed = source, field, problem, allowed
        message = f"{source}: {field}: {problem}"
        if allowed:
            message += f"; allowed: {allowed}"
        super().__init__(message)
