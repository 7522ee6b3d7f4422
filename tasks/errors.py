"""The errors a user can fix, in one place. Each message names the key, file, column or row
and says what to do; the CLI prints it as one paragraph (exit 2) and the Prefect logs carry
it without a traceback. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A problem with what the user gave us (config, data, environment), not with accelflow."""


class ConfigError(UserError, ValueError):
    """A config problem; the message names the key or file."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, column or row and what to do."""


class StageInputError(UserError, RuntimeError):
    """A stage's input (an earlier stage's output) was changed or removed by hand."""


class TrainingError(UserError, RuntimeError):
    """The training workers failed; the message carries their own error and the log's path."""


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The UserError behind `exc` (itself, or anywhere in its cause/context chain), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
