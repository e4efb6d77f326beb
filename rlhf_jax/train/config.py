"""Config validation and the command-line entry point every experiment shares.

An experiment's config is an ``ml_collections.ConfigDict`` returned by ``get_config()``.
It is checked against a *schema* when the run starts: a mapping from key to
:class:`Field` (type, required, allowed values, range) or to a nested schema for a nested
ConfigDict. Every problem is reported at once, each naming the key path, the value and
what was expected; keys the schema does not know (typos) are rejected with the nearest
known key suggested.

An experiment file stays thin::

    SCHEMA = {"learning_rate": Field(float, minimum=0.0), ...}

    def run(config, workdir): ...

    if __name__ == "__main__":
        main_from_flags(run, schema=SCHEMA)

and runs as ``python experiment.py --config=configs/x.py --workdir=/tmp/run
--config.learning_rate=3e-4``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import ml_collections
from absl import app, flags
from ml_collections import config_flags

Schema = Mapping[str, Union["Field", "Schema"]]


class ConfigError(ValueError):
    """A config does not match its schema; the message lists every problem by key path."""


@dataclasses.dataclass(frozen=True)
class Field:
    """What one config key must hold.

    Attributes:
      type: the allowed type or tuple of types. ``float`` also accepts ``int``; ``int``
        and ``float`` never accept ``bool``.
      required: the key must be present.
      choices: when set, the value must be one of these.
      minimum: inclusive lower bound for numbers.
      maximum: inclusive upper bound for numbers.
      allow_none: ``None`` is accepted whatever ``type`` says.
    """

    type: type | tuple[type, ...]
    required: bool = True
    choices: Sequence[Any] | None = None
    minimum: float | None = None
    maximum: float | None = None
    allow_none: bool = False

    def _accepted_types(self) -> tuple[type, ...]:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        return (*types, int) if float in types and int not in types else types

    def describe(self) -> str:
        """The expectation in words, e.g. ``a float in [0, 1]``."""
        names = " or ".join(t.__name__ for t in self._accepted_types())
        text = f"a value of type {names}"
        if self.choices is not None:
            text += f" among {list(self.choices)}"
        if self.minimum is not None or self.maximum is not None:
            low = "-inf" if self.minimum is None else self.minimum
            high = "inf" if self.maximum is None else self.maximum
            text += f" in [{low}, {high}]"
        return text + (" or None" if self.allow_none else "")

    def check(self, value: Any) -> bool:
        """Whether ``value`` satisfies this field."""
        if value is None:
            return self.allow_none
        types = self._accepted_types()
        if isinstance(value, bool) and bool not in types:
            return False
        if not isinstance(value, types):
            return False
        if self.choices is not None and value not in self.choices:
            return False
        if self.minimum is not None and value < self.minimum:
            return False
        return self.maximum is None or value <= self.maximum


def _problems(config: Mapping[str, Any], schema: Schema, prefix: str) -> list[str]:
    """Every mismatch between ``config`` and ``schema`` under the key path ``prefix``."""
    problems = []
    for key in config:
        if key not in schema:
            near = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"; did you mean {prefix}.{near[0]}?" if near else ""
            problems.append(f"{prefix}.{key}: unknown key (known keys: {sorted(schema)}){hint}")
    for key, expected in schema.items():
        path = f"{prefix}.{key}"
        if key not in config:
            if isinstance(expected, Mapping) or expected.required:
                problems.append(f"{path}: missing; expected {_describe(expected)}")
            continue
        value = config[key]
        if isinstance(expected, Mapping):
            if not isinstance(value, Mapping | ml_collections.ConfigDict):
                problems.append(f"{path}: got {value!r}; expected a nested config")
            else:
                problems.extend(_problems(value, expected, path))
        elif not expected.check(value):
            problems.append(
                f"{path}: got {value!r} ({type(value).__name__}); expected {expected.describe()}"
            )
    return problems


def _describe(expected: Field | Schema) -> str:
    """A field's expectation, or ``a nested config`` for a nested schema."""
    return expected.describe() if isinstance(expected, Field) else "a nested config"


def validate_config(
    config: ml_collections.ConfigDict | Mapping[str, Any], schema: Schema, *, name: str = "config"
) -> None:
    """Check every key of ``config`` against ``schema``.

    Args:
      config: the config (a ``ConfigDict`` or a plain mapping).
      schema: key -> :class:`Field`, or key -> nested schema for a nested config.
      name: the root of the key paths in messages (``config.optimizer.lr``).

    Raises:
      ConfigError: listing every unknown key, missing key, wrong type, value outside
        the allowed choices or range, each with its key path, value and expectation.
    """
    problems = _problems(config, schema, name)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def define_flags() -> None:
    """Define ``--config`` (an ml_collections config file) and ``--workdir`` once."""
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "Path to the config file.")
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")


def main_from_flags(
    run_fn: Callable[[ml_collections.ConfigDict, str], Any],
    *,
    schema: Schema | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """Parse ``--config`` and ``--workdir``, validate the config and call ``run_fn``.

    Args:
      run_fn: ``run_fn(config, workdir)``, the experiment.
      schema: when given, the config is validated with :func:`validate_config` first.
      argv: command line (``sys.argv`` by default).
    """
    define_flags()

    def main(args: list[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected positional arguments: {args[1:]}")
        config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
        if config is None or workdir is None:
            raise app.UsageError("both --config and --workdir are required")
        if schema is not None:
            validate_config(config, schema)
        run_fn(config, workdir)

    app.run(main, argv=None if argv is None else list(argv))
