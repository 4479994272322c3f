"""User-facing errors: each one says what was expected, what was found, and what to do."""


class KappaError(Exception):
    """An error the user can act on; the CLI prints it as one line and exits non-zero."""
