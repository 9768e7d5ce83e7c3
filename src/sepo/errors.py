"""Errors a user can act on. The CLI prints them as one message, never as a traceback."""

from __future__ import annotations


class SepoError(Exception):
    """Something the user can fix (bad input, bad config, missing file). Printed without a traceback."""


class ConfigError(SepoError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(SepoError):
    """A row of an input file is unusable. Names the file, the (1-based) row and the field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ):
        self.file, self.row, self.field, self.hint, self.reason = file, row, field, hint, message
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        text = (": ".join([", ".join(where), message]) if where else message)
        if hint:
            text += f"\n  hint: {hint}"
        super().__init__(text)
