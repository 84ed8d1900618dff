"""One source of health for every consumer that colours or judges.

The alert rules (:mod:`consumers.alerting.rules`, with ``--rules FILE`` overrides) are the
configuration; the :class:`HealthTable` and the :class:`Spike` definitions that the monitor,
tail and aggregator colour and rank by are *derived* from the same rules here, so that a
value the alert process calls critical is red on every screen and the aggregator's worst
worker is the one the alert names. Every one of those commands takes ``--rules FILE``
(default: ``$TRAINBUS_RULES``), so one file set once in the environment reaches them all.

What is derived: a threshold rule's levels replace the levels of the health threshold of
the same name; a threshold rule the file adds colours its metric too; spike rules become
the spikes (factor levels, ``min_history``, ``for`` as ``sustain``). A rule turned off with
``enabled = false`` stops paging but keeps its colour: muting a pager is not the same as
declaring a value healthy (explained variance is off as an alert by default and still
colours its cell yellow below 0).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass

from consumers.alerting.rules import Rule, RulesError, load_rules
from consumers.thresholds import (
    DEFAULT_HEALTH,
    DEFAULT_SPIKES,
    DEFAULT_THRESHOLDS,
    HealthTable,
    Spike,
)

ENV_RULES = "TRAINBUS_RULES"


@dataclass(frozen=True, slots=True)
class Health:
    """The levels a consumer judges by: absolute thresholds and relative spikes."""

    table: HealthTable
    spikes: tuple[Spike, ...]


DEFAULT = Health(DEFAULT_HEALTH, DEFAULT_SPIKES)


def health_from_rules(rules: Mapping[str, Rule]) -> Health:
    """The health table and spikes that agree with ``rules`` (disabled rules included)."""
    judged = {r.name: r.threshold for r in rules.values() if r.kind == "threshold"}
    # The built-in thresholds in their table order (a rule's levels where it has one),
    # then the threshold rules the file added.
    thresholds = [judged.pop(t.name, t) for t in DEFAULT_THRESHOLDS]
    thresholds.extend(judged.values())
    spikes = tuple(rule.spike for rule in rules.values() if rule.kind == "spike")
    return Health(HealthTable(thresholds), spikes)


def load_health(path: str | os.PathLike[str] | None) -> Health:
    """:func:`health_from_rules` of the defaults overridden by ``path`` (None: defaults).
    Raises RulesError (one line naming the file and key) or FileNotFoundError."""
    if path is None:
        return DEFAULT
    return health_from_rules(load_rules(path, include_disabled=True))


def add_rules_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", metavar="FILE", default=os.environ.get(ENV_RULES) or None,
                        help="TOML file overriding (by rule name) or adding alert rules; colours "
                             f"and health follow the same levels (env {ENV_RULES})")


def health_from_args(args: argparse.Namespace) -> Health:
    """The health of ``--rules``; misuse becomes the CLI's one-line UsageError."""
    from bus.cli import UsageError

    path = getattr(args, "rules", None)
    try:
        return load_health(path)
    except RulesError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"--rules: cannot read {path}: {exc.strerror or exc}") from None
