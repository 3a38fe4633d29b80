"""A task file's templates applied to one row, exactly as lm-evaluation-harness applies them.

Each of `doc_to_text`, `doc_to_choice` and `doc_to_target` is a field name (the row's value),
a Jinja2 template (rendered with the row's fields, undefined names an error), a list, or a
`!function`. A rendered choice list is read as a Python literal; a rendered target that is
all digits is a choice index (for multiple choice). The prompt is the rendered `description`
followed by `doc_to_text`; the answer follows the prompt after `target_delimiter`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment


class BadRow(ValueError):
    """What is wrong with one row; the reader adds the file, the line and the fix."""


def _regex_replace(text: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, text, count=count)


# lm-eval's environment (undefined names are errors, trailing newlines kept, its one extra
# filter), sandboxed: a task file from elsewhere renders text but reaches nothing else.
_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_ENV.filters["regex_replace"] = _regex_replace


class BadTemplate(ValueError):
    """A template that does not compile; the reader adds the file."""


class _Null:
    """A null field as a template sees it: false in a test (`{% if input %}`), an error
    where its text is used, instead of lm-eval's silent "None"."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        raise BadRow(f"field {self.field!r} is null on this row")


def shown(value: Any, width: int = 120) -> str:
    """A value as an error message quotes it, cut to `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


class Template:
    """One of a task's doc_to_* settings, compiled once."""

    def __init__(self, key: str, value: Any) -> None:
        self.key, self.value = key, value
        self.compiled, self.fields = None, set()
        if isinstance(value, str):
            try:
                self.compiled = _ENV.from_string(value)
                self.fields = meta.find_undeclared_variables(_ENV.parse(value))
            except jinja2.TemplateSyntaxError as err:
                raise BadTemplate(
                    f"{key}: not a valid Jinja template ({err.message}, line {err.lineno} of "
                    "the template); fix the template"
                ) from None

    def render(self, doc: dict[str, Any]) -> str:
        seen = {k: _Null(k) if v is None and k in self.fields else v for k, v in doc.items()}
        try:
            return self.compiled.render(**seen)
        except BadRow as err:
            raise BadRow(f"{self.key}: {err}") from None
        except jinja2.UndefinedError as err:
            raise BadRow(f"{self.key} names a missing field ({err.message})") from None
        except Exception as err:  # noqa: BLE001 - a template's own error, on this row
            # Name what the template read, so the row's bad value shows (an answer key that
            # is not among the labels: "'Z' is not in list" alone names neither).
            read = ", ".join(f"{k}={shown(doc[k])}" for k in sorted(self.fields) if k in doc)
            raise BadRow(
                f"{self.key} fails on this row ({type(err).__name__}: {err}; the template "
                f"reads {read or 'no field'})"
            ) from None

    def apply(self, doc: dict[str, Any]) -> Any:
        """The setting's value for `doc`: a field's value, a rendered template, a list or
        what a function returns; see `text`, `choices` and `target` for the post-processing."""
        if isinstance(self.value, str):
            if self.value in doc:
                return doc[self.value]
            if self.value.isidentifier():
                # lm-eval would render it as literal text: a misspelt field, every time.
                raise BadRow(f"{self.key} names a missing field {self.value!r}")
            return self.render(doc)
        if isinstance(self.value, Callable):
            try:
                return self.value(doc)
            except Exception as err:  # noqa: BLE001 - the user's function: name it, once
                raise BadRow(f"{self.key} function fails on this row ({err!r})") from None
        return self.value


def text(template: Template, doc: dict[str, Any]) -> str:
    value = template.apply(doc)
    if not isinstance(value, str):
        raise BadRow(f"{template.key} gives {type(value).__name__} {value!r}, not text")
    return value


def choices(template: Template, doc: dict[str, Any]) -> list[str]:
    value = template.apply(doc)
    if isinstance(value, str) and not (isinstance(template.value, str) and template.value in doc):
        try:
            value = ast.literal_eval(value)
        except (SyntaxError, ValueError):
            raise BadRow(f"doc_to_choice renders {value!r}, not a list of choices") from None
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list | tuple) or len(value) < 2:
        raise BadRow(f"doc_to_choice gives {value!r}; a question needs a list of 2+ choices")
    for k, choice in enumerate(value):
        if not isinstance(choice, str) or not choice.strip():
            raise BadRow(f"choice {k + 1} is empty ({choice!r}); every choice needs text")
    return list(value)


def target(template: Template, doc: dict[str, Any], is_choice: bool) -> int | str | list[str]:
    """The answer: an index into the choices or a choice's text (multiple choice), or the
    reference text (generation), or for generation a list of references (the first one
    trains; the metrics score against all)."""
    value = template.apply(doc)
    rendered = isinstance(template.value, str) and template.value not in doc
    if rendered and is_choice and value.isdigit():
        return int(value)
    if not is_choice and isinstance(value, list | tuple):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise BadRow(f"doc_to_target gives {value!r}; give a list of non-empty references")
        return list(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRow(f"doc_to_target gives {type(value).__name__} {value!r}; give one answer")
    return value if is_choice else str(value)
