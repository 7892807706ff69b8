"""The one exception type that reaches users as a plain message instead of a traceback, and the
one warning type for settings that work but probably not as meant."""

import warnings

_WORKER_MARKER = "Caught MixtrainError in DataLoader worker"


class MixtrainError(Exception):
    """Bad input or an unusable setting, described in words a user can act on.

    The CLI prints ``error: <message>`` and exits non-zero; with ``--debug`` it re-raises so the
    traceback is shown.

    A DataLoader worker that raises this error has it re-created in the main process with the
    worker's whole traceback as its message; the constructor recovers the original message (the
    traceback stays in :attr:`worker_traceback` for ``--debug``), so a corrupt image in a folder
    dataset still reads as one line naming the file.
    """

    worker_traceback: str | None = None

    def __init__(self, message="", *args):
        text = str(message)
        if text.startswith(_WORKER_MARKER):
            marker = f"{__name__}.MixtrainError: "
            at = text.rfind(marker)
            if at >= 0:
                self.worker_traceback = text
                message = text[at + len(marker) :].strip()
        super().__init__(message, *args)


class MixtrainWarning(UserWarning):
    """A setting that runs but probably not as meant: a run that will never mix, more workers than
    CPU cores, a mixing epoch planned from an empty loss memory, a skipped file. The CLI prints it
    as one ``warning:`` line; in Python it is an ordinary warning (``warnings.simplefilter("error",
    MixtrainWarning)`` turns it into an exception)."""


def notice(message: str, stacklevel: int = 2):
    """Warn the user with a :class:`MixtrainWarning` (``stacklevel`` as for ``warnings.warn``, counted
    from the caller)."""
    warnings.warn(message, MixtrainWarning, stacklevel=stacklevel + 1)


_OOM_TEXT = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "can't allocate memory")


def out_of_memory(e: BaseException) -> bool:
    """``e`` (or an exception it was raised from or during) is a failed memory allocation:
    ``torch.OutOfMemoryError`` (CUDA), or a library's allocation failure reported as a
    ``RuntimeError`` (cuBLAS, cuDNN, the CPU allocator). A :class:`MixtrainError` never is: it has
    already been worded for the user."""
    import torch

    seen = set()
    while e is not None and id(e) not in seen and not isinstance(e, MixtrainError):
        seen.add(id(e))
        if isinstance(e, torch.OutOfMemoryError):
            return True
        if isinstance(e, RuntimeError) and any(t in str(e) for t in _OOM_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False
