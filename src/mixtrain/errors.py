"""The one exception type that reaches users as a plain message instead of a traceback."""


class MixtrainError(Exception):
    """Bad input or an unusable setting, described in words a user can act on.

    The CLI prints ``error: <message>`` and exits non-zero; with ``--debug`` it re-raises so the
    traceback is shown.
    """
