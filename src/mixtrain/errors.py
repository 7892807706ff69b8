"""The one exception type that reaches users as a plain message instead of a traceback (with its
kind for options, which names them by field or by flag), and the one warning type for settings
that work but probably not as meant."""

import string
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


class OptionError(MixtrainError):
    """An option out of its range, or at odds with another option. The message names each option
    by its field (``batch_size must be at least 1, got 0``; ``mix.rule`` for a mixing option of a
    :class:`~mixtrain.TrainConfig`); the command line names them by flag instead (``--batch-size
    must be at least 1, got 0``) through :meth:`render`.

    ``template`` is a :meth:`str.format` string: a ``{name}`` that is one of ``values`` stands for
    that value (with its conversion and format spec, as ``{got!r}``), any other ``{name}`` for the
    option of that field. :attr:`options` lists the options it names.
    """

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        super().__init__(self.render())

    @property
    def options(self) -> list[str]:
        """The fields of the options the message names, in order (each once)."""
        names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None and f not in self.values]
        return list(dict.fromkeys(names))

    def render(self, name=str) -> str:
        """The message with each option written as ``name(field)`` (the field itself by default)."""
        return _OptionNames(name).vformat(self.template, (), self.values)

    def within(self, prefix: str) -> "OptionError":
        """The same error for options that sit under ``prefix`` (``mix``: ``rule`` becomes ``mix.rule``)."""
        parts = []
        for text, f, spec, conversion in string.Formatter().parse(self.template):
            parts.append(text.replace("{", "{{").replace("}", "}}"))
            if f is not None:
                f = f if f in self.values else f"{prefix}.{f}"
                parts.append("{" + f + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
        return OptionError("".join(parts), **self.values)

    def __reduce__(self):  # pickled (a worker process's error) with its class, template and values
        return _option_error, (self.template, self.values, type(self))


def _option_error(template: str, values: dict, cls=OptionError) -> OptionError:
    return cls(template, **values)


class DivergedError(OptionError):
    """A run stopped because its loss or weights became non-finite (the message says where and
    which checkpoint is the last good one). A bench records such a run and goes on with the next."""


class _OptionNames(string.Formatter):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def get_field(self, field_name, args, kwargs):
        if field_name in kwargs:
            return kwargs[field_name], field_name
        return self.name(field_name), field_name


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
