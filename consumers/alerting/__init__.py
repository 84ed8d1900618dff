"""Alerting: PPO health turned into notifications an operator can trust.

Modules, bottom up:

* :mod:`.rules`: what is watched, at which levels and how patiently (TOML ``--rules``).
* :mod:`.engine`: the pure state machine (Prometheus rule evaluation plus Alertmanager's
  notification policy), no I/O, ``now`` passed in.
* :mod:`.sinks`: where notifications go (console, JSONL, bus, exec, webhook), each pager
  sink on its own thread so delivery never delays evaluation.
* :mod:`.alertmanager`: the ``--alertmanager`` sink, keeping Prometheus Alertmanager's
  view of the firing alerts in step (API v2, re-posted while firing).
* :mod:`.promrules`: the effective rules as a Prometheus rule file (``--list-rules
  --format prometheus``) over the exporter's series.
* :mod:`.process`: ``trainbus alert``, the subscriber loop wiring them together.
"""
