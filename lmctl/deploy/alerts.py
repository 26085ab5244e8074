"""Prometheus alerting rules for a deployment's SLOs, over the series `lmctl serve` exports.

    OUT/alerts.rules.yaml    a Prometheus rule file (`rule_files:`; `promtool check rules` passes)
    OUT/prometheusrule.yaml  the same groups as a prometheus-operator PrometheusRule (kubernetes)

Every expression aggregates `by (model, version)` (plus `key` for quotas), so every alert carries
the model and the version it is about: a canary's errors page as the canary's. Series used
(lmctl.serve.metrics): lmctl_requests_total{endpoint,status}, the buckets of
lmctl_request_latency_seconds and lmctl_time_to_first_token_seconds, lmctl_canary_rollbacks_total,
lmctl_model_reloads_total{outcome="refused"}, and lmctl_quota_refusals_total{key,reason} (the
per-key limits' refusals; `reason="tokens_per_day"` is a spent daily budget; a server without
keys files never exports it, and that rule never fires). Quota refusals come before a version is
picked, so that series has no model or version label: its alert carries the deployment's model
and stable version as fixed labels, and counts every server the Prometheus scrapes.

Written by hand, not with a generator such as Sloth or Pyrra: they are Go binaries with their own
spec formats, and the rules here are a few dozen lines of PromQL whose every alert is unit-tested
with `promtool test rules` (tests/test_alerts.py).
"""

from __future__ import annotations

from typing import Any

from lmctl.deploy.slo import BurnWindow, SloConfig

RULES_FILE = "alerts.rules.yaml"
PROMETHEUS_RULE_FILE = "prometheusrule.yaml"
BY = "model, version"
RUNBOOK = "docs/operations.md#slo-alerts"
REFUSED, SPENT = 'outcome="refused"', 'reason="tokens_per_day"'


def _pct(share: float) -> str:
    return f"{share * 100:.4g}%"


def _matchers(slo: SloConfig, model: str, *extra: str) -> str:
    name = slo.model or model
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return "{" + ", ".join([f'model="{quoted}"', *extra]) + "}"


def _alert(slo: SloConfig, name: str, expr: str, severity: str, summary: str, description: str, hint: str,
           for_: str | None = None, fixed: dict[str, str] | None = None) -> dict[str, Any]:
    annotations = {"summary": summary, "description": description, "runbook": f"{hint} (lmctl {RUNBOOK})"}
    if slo.runbook_url:
        annotations["runbook_url"] = f"{slo.runbook_url}#{name.lower()}"
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {**slo.alert_labels, **(fixed or {}), "severity": severity}
    rule["annotations"] = annotations
    return rule


def _error_ratio(slo: SloConfig, model: str, window: str) -> str:
    endpoints = "|".join(slo.endpoints)
    errors = _matchers(slo, model, f'endpoint=~"{endpoints}"', f'status=~"{slo.error_status}"')
    total = _matchers(slo, model, f'endpoint=~"{endpoints}"')
    return (f"sum by ({BY}) (rate(lmctl_requests_total{errors}[{window}]))\n"
            f"  / sum by ({BY}) (rate(lmctl_requests_total{total}[{window}]))")


def burn_alert(slo: SloConfig, model: str, window: BurnWindow) -> dict[str, Any]:
    rate = slo.burn_rate(window)
    threshold = f"{rate * (1 - slo.availability):.6g}"
    expr = (f"(\n  {_error_ratio(slo, model, window.long_window)}\n) > {threshold}\nand\n"
            f"(\n  {_error_ratio(slo, model, window.short_window)}\n) > {threshold}\n")
    return _alert(
        slo, f"LmctlErrorBudgetBurn{window.long_window}", expr, window.severity,
        summary="{{ $labels.model }} version {{ $labels.version }} burns its error budget "
                f"{rate:.3g}x too fast",
        description=("{{ $value | humanizePercentage }} of requests failed over the last "
                     f"{window.long_window} (and over {window.short_window}); the SLO of {_pct(slo.availability)} "
                     f"over {slo.period} allows {_pct(1 - slo.availability)}. At this rate "
                     f"{window.budget_consumed:.0%} of the budget is gone in {window.long_window}."),
        hint="check the version's /healthz and server log for 5xx; a canary: lower its weight or roll back")


def quantile_alert(slo: SloConfig, model: str, name: str, series: str, quantile: float, objective: float,
                   extra: tuple[str, ...], what: str) -> dict[str, Any]:
    buckets = f"{series}_bucket{_matchers(slo, model, *extra)}"
    expr = (f"histogram_quantile({quantile}, sum by ({BY}, le) (rate({buckets}[{slo.latency_window}])))"
            f" > {objective:g}\n")
    return _alert(
        slo, name, expr, "ticket",
        summary=f"{{{{ $labels.model }}}} version {{{{ $labels.version }}}} p{quantile * 100:g} {what} over "
                f"{objective:g}s",
        description=(f"p{quantile * 100:g} {what} is {{{{ $value | humanizeDuration }}}} over the last "
                     f"{slo.latency_window} (objective {objective:g}s), for {slo.latency_for}."),
        hint="check lmctl_queue_depth and lmctl_batch_running: scale out, or lower max_tokens_cap",
        for_=slo.latency_for)


def latency_alerts(slo: SloConfig, model: str) -> list[dict[str, Any]]:
    endpoints = f'endpoint=~"{"|".join(slo.endpoints)}"'
    return [
        quantile_alert(slo, model, "LmctlLatencyP95High", "lmctl_request_latency_seconds", 0.95, slo.latency_p95_s,
                       (endpoints,), "latency"),
        quantile_alert(slo, model, "LmctlLatencyP99High", "lmctl_request_latency_seconds", 0.99, slo.latency_p99_s,
                       (endpoints,), "latency"),
        quantile_alert(slo, model, "LmctlTimeToFirstTokenHigh", "lmctl_time_to_first_token_seconds", 0.95,
                       slo.ttft_p95_s, (), "time to first token"),
    ]


def _counted(slo: SloConfig, series: str, matchers: str, by: str = BY) -> str:
    """Whether `series` counted anything in the event window. A labelled counter is exported only
    from its first increment on, at 1, where increase() sees nothing: a series that exists now
    but did not one window ago counts too."""
    w = slo.event_window
    return (f"sum by ({by}) (increase({series}{matchers}[{w}])) > 0\n"
            f"or sum by ({by}) ({series}{matchers} unless {series}{matchers} offset {w})\n")


def event_alerts(slo: SloConfig, model: str, version: str) -> list[dict[str, Any]]:
    w = slo.event_window
    return [
        _alert(slo, "LmctlCanaryRolledBack", _counted(slo, "lmctl_canary_rollbacks_total", _matchers(slo, model)),
               "ticket", summary="canary {{ $labels.version }} of {{ $labels.model }} was rolled back",
               description=f"the server took the canary out of traffic in the last {w}: its error rate or p95 "
                           "broke the canary policy's margins over the stable version.",
               hint="compare the versions (lmctl eval / lmctl registry diff) before promoting it again"),
        _alert(slo, "LmctlReloadRefused",
               _counted(slo, "lmctl_model_reloads_total", _matchers(slo, model, REFUSED)), "ticket",
               summary="{{ $labels.model }}: the alias moved to version {{ $labels.version }}, which was refused",
               description=f"in the last {w} a server following the alias refused to load the version it moved "
                           "to (failed verification or load); it keeps serving the previous one.",
               hint="read the reload events on /healthz; fix or move the alias back (lmctl promote)"),
        _alert(slo, "LmctlQuotaExhausted",
               _counted(slo, "lmctl_quota_refusals_total", "{" + SPENT + "}", "key"), "ticket",
               summary=f"API key {{{{ $labels.key }}}} spent its token budget on {slo.model or model}",
               description=f"requests of key {{{{ $labels.key }}}} were refused with insufficient_quota in the last "
                           f"{w}: its tokens-per-day budget is spent.",
               hint="raise the key's budget in the keys file if the use is legitimate, else find the runaway client",
               fixed={"model": slo.model or model, "version": version}),
    ]


def rule_groups(slo: SloConfig, model: str, app: str, version: str = "") -> list[dict[str, Any]]:
    """The rule groups, one per concern, named after the deployment (`model`, `version`: what its
    stable server reports)."""
    return [
        {"name": f"lmctl-{app}-availability", "rules": [burn_alert(slo, model, w) for w in slo.burn_windows]},
        {"name": f"lmctl-{app}-latency", "rules": latency_alerts(slo, model)},
        {"name": f"lmctl-{app}-events", "rules": event_alerts(slo, model, version)},
    ]


def rules_file(slo: SloConfig, model: str, app: str, version: str = "") -> dict[str, Any]:
    return {"groups": rule_groups(slo, model, app, version)}


def prometheus_rule(slo: SloConfig, model: str, app: str, namespace: str, labels: dict[str, str],
                    version: str = "") -> dict[str, Any]:
    """The groups as a prometheus-operator PrometheusRule (monitoring.coreos.com/v1)."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": app, "namespace": namespace, "labels": {**labels, **slo.rule_labels}},
            "spec": {"groups": rule_groups(slo, model, app, version)}}


def summary(slo: SloConfig, model: str) -> dict[str, Any]:
    """What deploy.json records about the alerts: the files, the model watched, the SLOs, the alert names."""
    names = [rule["alert"] for group in rule_groups(slo, model, "a") for rule in group["rules"]]
    return {"rules_file": RULES_FILE, "model": slo.model or model, "alerts": names,
            "slo": slo.model_dump(mode="json", exclude={"alert_labels", "rule_labels", "runbook_url", "model"})}
