"""ibbench's exceptions, in one place. Each survives pickling (Ray ships a trial's error to the driver by pickle;
an exception whose constructor cannot be called again with `self.args` would arrive as a TypeError instead).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input, reported as one line and exit code 2 by the CLI: `<file>: <field>: <problem>; allowed: <…>`."""

    def __init__(self, source: str, field: str, problem: str, allowed: str | None = None):
        self.source, self.field, self.problem, self.allowed = source, field, problem, allowed
        message = f"{source}: {field}: {problem}"
        if allowed:
            message += f"; allowed: {allowed}"
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.source, self.field, self.problem, self.allowed)


class UnknownNameError(LookupError):
    """A name that is not registered; the message lists the valid ones."""

    def __init__(self, kind: str, name: object, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, valid
        super().__init__(f"unknown {kind} {name!r}; allowed: {', '.join(valid) or '(none registered)'}")

    def __reduce__(self):
        return type(self), (self.kind, self.name, self.valid)


class TrainingFailed(RuntimeError):
    """The run stopped without a result (e.g. a non-finite loss); summary.json holds the reason."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self):
        return type(self), (self.reason,)


class RunLocked(RuntimeError):
    """Another live process (on this node or another) is training this run directory."""

    def __init__(self, message: str):
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self),)
