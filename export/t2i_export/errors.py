"""The one error type the exporter raises for bad input; the CLI prints it as a single line."""


class ExportError(Exception):
    """Bad input (missing directory, incompatible adapter, ...). The message says what and how to fix it."""
