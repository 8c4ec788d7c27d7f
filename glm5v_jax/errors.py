"""Errors raised for bad configuration, always naming the offending field, and for runs that stop.

`ConfigError(field, message)` is the one error style for configuration (and for refusals: a resume
that would change what is trained, a locked run directory). `RunError` is a run that stops itself
(non-finite training, a checkpoint that could not be saved). At the command line, `run_cli(main)`
(in place of `absl.app.run(main)`) turns a ConfigError into one line on stderr and exit status 2
(also when it is raised by a config file's `get_config` while the flags are parsed), a RunError
into one line and exit status 1.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Callable

# "field: message", the field one or two words (`preset`, `option mmtp`,
# `config.model.backbone.num_kv_heads`, `config.teachers.siglip2.kind`).
_FIELD_LINE = re.compile(r"^(?P<field>[\w.\[\]'\"-]+(?: [\w.\[\]'\"-]+)?): (?P<detail>.+)$", re.DOTALL)
# The last line of a formatted traceback that ends in a ConfigError.
_TRACEBACK_LAST = re.compile(r"^\s*(?:[\w.]+\.)?ConfigError: (?P<text>.+)$")


def _parse(text: str) -> tuple[str | None, str]:
    """(field, message) back from `str(ConfigError)`, or from a traceback ending in one;
    (None, text) when the text names no field."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1:
        last = _TRACEBACK_LAST.match(lines[-1])
        if last is None:
            return None, text
        text = last.group("text")
    m = _FIELD_LINE.match(text.strip())
    return (m.group("field"), m.group("detail")) if m else (None, text)


class ConfigError(ValueError):
    """A configuration value that cannot work.

    `field` is the dotted name of the offending field (for example
    `config.model.backbone.num_kv_heads`); the message says what was expected.

    Also constructible from one argument, the text `str(e)` gives ("field: message"), as code
    that re-raises an exception with `type(e)(text)` does (ml_collections' config_flags does,
    with a whole traceback as the text; its last line names the field) and as unpickling does.
    `field` is then parsed back from the text, or None when the text names none.
    """

    def __init__(self, field: str | None, message: str | None = None):
        if message is None:
            text = "" if field is None else str(field)
            field, message = _parse(text)
            super().__init__(text)
        else:
            super().__init__(message if field is None else f"{field}: {message}")
        self.field = field
        self.detail = message

    def with_prefix(self, prefix: str) -> "ConfigError":
        """The same error with `prefix.` put in front of the field name."""
        return ConfigError(prefix if self.field is None else f"{prefix}.{self.field}", self.detail)


class RunError(RuntimeError):
    """A run that stopped itself for a reason its message gives (what happened, what is kept, what to do)."""


def require(condition: bool, field: str, message: str) -> None:
    """Raise `ConfigError(field, message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(field, message)


def find_config_error(exc: BaseException | None) -> ConfigError | None:
    """The ConfigError behind `exc`: `exc` itself or one it was raised from or while handling
    (`__cause__`, `__context__`, up to a `raise ... from None`); the innermost one that names a
    field, which carries the original field and message."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConfigError) and (found is None or exc.field is not None):
            found = exc
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    return found


def config_error_line(error: ConfigError) -> str:
    """The one-line report of `error`: `config error: <field>: <message>`."""
    text = f"{error.field}: {error.detail}" if error.field is not None else str(error)
    return "config error: " + " ".join(text.split())


def exit_on_config_error(error: ConfigError, status: int = 2) -> None:
    """Print `config_error_line(error)` to stderr and exit with `status` (no traceback)."""
    sys.stderr.write(config_error_line(error) + "\n")
    sys.stderr.flush()
    raise SystemExit(status)


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """`absl.app.run(main, argv)` for a command-line entry point, with a ConfigError reported as
    one line on stderr and exit status 2: one raised while the flags are parsed (a config file's
    `get_config`, which ml_collections and absl re-raise as flag errors) or by `main`; a RunError
    as one line and exit status 1. Other flag errors get absl's usual report."""
    from absl import app, flags

    def parse_flags(args):
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            error = find_config_error(e)
            if error is not None:
                exit_on_config_error(error)
        return app.parse_flags_with_usage(args)  # parses again: absl's message and exit status

    def guarded_main(args):
        try:
            return main(args)
        except ConfigError as e:
            exit_on_config_error(find_config_error(e))
        except RunError as e:
            sys.stderr.write("run stopped: " + " ".join(str(e).split()) + "\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

    app.run(guarded_main, argv, flags_parser=parse_flags)
