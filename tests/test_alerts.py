"""The SLO alerting rules `lmctl deploy` writes, checked by Prometheus' own tools.

`promtool check rules` must pass on every rendered file and refuse a broken one; `promtool test
rules` then evaluates each alert over synthetic series shaped like `lmctl serve`'s (the metric and
label names of lmctl.serve.metrics): it must fire where the SLO is broken and stay quiet on a
healthy server. promtool compares annotations too, so the expected ones are the rule's templates
with the labels and the value each scenario gives. Skipped only where promtool is not installed
(Debian's `prometheus` package ships it; .ci/run installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmctl.deploy.alerts import rules_file
from lmctl.deploy.kubernetes import dump
from lmctl.deploy.slo import SloConfig, load_slo
from lmctl.errors import BadInputError

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
M, V = "tiny", "1"
REQ = 'lmctl_requests_total{{model="{m}", version="{v}", endpoint="{e}", status="{s}"}}'


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "alerts.rules.yaml"
    path.write_text(dump(rules_file(SloConfig(), M, "tiny", V)), encoding="utf-8")
    return path


def _rule(rules: Path, name: str) -> dict[str, Any]:
    doc = yaml.safe_load(rules.read_text())
    return next(r for g in doc["groups"] for r in g["rules"] if r["alert"] == name)


def _expand(template: str, labels: dict[str, str], value: str | None) -> str:
    """What Prometheus makes of the few template forms the rules use."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    if value is not None:
        text = re.sub(r"\{\{ \$value \| \w+ \}\}", value, text)
    assert "{{" not in text, text
    return text


def expect(rules: Path, name: str, labels: dict[str, str], value: str | None = None) -> dict[str, Any]:
    rule = _rule(rules, name)
    return {"exp_labels": {**rule["labels"], **labels},
            "exp_annotations": {k: _expand(v, labels, value) for k, v in rule["annotations"].items()}}


def unit_test(rules: Path, series: dict[str, str], eval_time: str, alerts: dict[str, list[dict[str, Any]]],
              evaluation: str = "1m") -> subprocess.CompletedProcess[str]:
    """`promtool test rules` over `series` (name{labels} -> promtool's expanding notation, a sample a
    minute): at `eval_time` exactly `alerts[name]` fire (an empty list: it stays quiet). Rules are
    evaluated every `evaluation` up to then (a long one where no rule has a `for`: 3-day windows are slow)."""
    test = {"rule_files": [rules.name], "evaluation_interval": evaluation,
            "tests": [{"interval": "1m",
                       "input_series": [{"series": s, "values": v} for s, v in series.items()],
                       "alert_rule_test": [{"eval_time": eval_time, "alertname": name, "exp_alerts": exp}
                                           for name, exp in alerts.items()]}]}
    path = rules.parent / "test.yaml"
    path.write_text(yaml.safe_dump(test, sort_keys=False), encoding="utf-8")
    return promtool("test", "rules", path)


def _ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stdout + done.stderr


BURNS = ["LmctlErrorBudgetBurn1h", "LmctlErrorBudgetBurn6h", "LmctlErrorBudgetBurn1d", "LmctlErrorBudgetBurn3d"]


def test_workbook_burn_rates_and_slo_defaults() -> None:
    slo = SloConfig()
    assert [round(slo.burn_rate(w), 6) for w in slo.burn_windows] == [14.4, 6.0, 3.0, 1.0]
    assert (slo.availability, slo.period, slo.latency_p95_s, slo.latency_p99_s, slo.ttft_p95_s) == (
        0.995, "30d", 1.0, 2.5, 0.5)
    doc = rules_file(slo, M, "tiny")
    names = [r["alert"] for g in doc["groups"] for r in g["rules"]]
    assert names == [*BURNS, "LmctlLatencyP95High", "LmctlLatencyP99High", "LmctlTimeToFirstTokenHigh",
                     "LmctlCanaryRolledBack", "LmctlReloadRefused", "LmctlQuotaExhausted"]
    fast = doc["groups"][0]["rules"][0]
    assert fast["labels"]["severity"] == "page" and "> 0.072" in fast["expr"]  # 14.4 x 0.5%
    by_version = [r["alert"] for g in doc["groups"] for r in g["rules"] if "by (model, version" in r["expr"]]
    assert by_version == names[:-1]  # quota refusals carry no model/version: that alert has them fixed
    assert {k: v for k, v in doc["groups"][2]["rules"][2]["labels"].items()} == {
        "model": M, "version": "", "severity": "ticket"}


def test_slo_file_errors_name_the_field(tmp_path: Path) -> None:
    cases = {"availability: 99.5\n": "availability", "period: 30 days\n": "period",
             "burn_windows: [{long_window: 5m, short_window: 1h, budget_consumed: 0.02, severity: page}]\n":
                 "shorter than long_window",
             "burn_windows: [{long_window: 1h, short_window: 5m, budget_consumed: 0.02, severity: page},"
             " {long_window: 1h, short_window: 2m, budget_consumed: 0.05, severity: ticket}]\n": "share a long_window",
             "latency_p95: 1\n": "latency_p95", "error_status: '5(('\n": "not a regex",
             "alert_labels: {bad-name: x}\n": "label name", "[1, 2]\n": "file"}
    for text, complaint in cases.items():
        path = tmp_path / "slo.yaml"
        path.write_text(text)
        with pytest.raises(BadInputError, match=re.escape(complaint)):
            load_slo(path)
    good = tmp_path / "good.yaml"
    good.write_text("availability: 0.999\nlatency_p95_s: 2\nalert_labels: {team: ml}\n")
    assert load_slo(good).availability == 0.999 and load_slo(None) == SloConfig()


@needs_promtool
def test_promtool_checks_every_rendered_file_and_refuses_a_broken_one(rules: Path, tmp_path: Path) -> None:
    _ok(promtool("check", "rules", rules))
    custom = SloConfig(availability=0.99, alert_labels={"team": "ml"}, runbook_url="https://runbooks.example/lmctl",
                       endpoints=["chat.completions"], model='we"ird')
    path = tmp_path / "custom.rules.yaml"
    path.write_text(dump(rules_file(custom, M, "x")))
    _ok(promtool("check", "rules", path))
    doc = yaml.safe_load(rules.read_text())
    for broken_value, key in (("sum by (model (rate(x[5m]))", "expr"), ("10 minutes", "for")):
        broken = yaml.safe_load(yaml.safe_dump(doc))
        broken["groups"][1]["rules"][0][key] = broken_value
        bad = tmp_path / f"broken-{key}.yaml"
        bad.write_text(yaml.safe_dump(broken))
        refused = promtool("check", "rules", bad)
        assert refused.returncode != 0, key


def _requests(ok: str, errors: str, version: str = V, error_status: str = "500") -> dict[str, str]:
    return {REQ.format(m=M, v=version, e="completions", s="200"): ok,
            REQ.format(m=M, v=version, e="completions", s=error_status): errors}


@needs_promtool
def test_error_budget_burn_alerts_fire_per_version_and_stay_quiet_when_healthy(rules: Path) -> None:
    labels = {"model": M, "version": V}
    # version 1 fails every request for 73 h; version 2 (a canary) is healthy: only version 1 alerts
    series = {**_requests("0x4380", "0+10x4380"), **_requests("0+10x4380", "0x4380", version="2")}
    _ok(unit_test(rules, series, "73h", {name: [expect(rules, name, labels, "100%")] for name in BURNS}, "1h"))
    # 0.1% server errors and many client errors (4xx are not the server's): every budget holds
    healthy = {**_requests("0+1000x4380", "0+1x4380"),
               REQ.format(m=M, v=V, e="completions", s="404"): "0+500x4380",
               REQ.format(m=M, v=V, e="completions", s="429"): "0+500x4380"}
    _ok(unit_test(rules, healthy, "73h", {name: [] for name in BURNS}, "1h"))
    # errors in the last 9 minutes only: the 1h window has 90 of 690 failed (13% > 7.2%: page), 6h 2.4% < 3%
    recent = _requests("0+10x4380", "0x4370 0+10x10")
    _ok(unit_test(rules, recent, "73h", {BURNS[0]: [expect(rules, BURNS[0], labels, "13.04%")],
                                         **{name: [] for name in BURNS[1:]}}, "1h"))


def _histogram(name: str, counts: dict[str, str], **labels: str) -> dict[str, str]:
    sel = ", ".join(f'{k}="{v}"' for k, v in {"model": M, "version": V, **labels}.items())
    return {f'{name}_bucket{{{sel}, le="{le}"}}': values for le, values in counts.items()}


@needs_promtool
def test_latency_and_ttft_alerts(rules: Path) -> None:
    labels = {"model": M, "version": V}
    slow = {**_histogram("lmctl_request_latency_seconds",  # every request between 2.5 s and 5 s
                         {"0.5": "0x30", "1": "0x30", "2.5": "0x30", "5": "0+10x30", "+Inf": "0+10x30"},
                         endpoint="completions"),
            **_histogram("lmctl_time_to_first_token_seconds",  # every first token between 0.5 s and 1 s
                         {"0.5": "0x30", "1": "0+10x30", "+Inf": "0+10x30"})}
    _ok(unit_test(rules, slow, "30m", {
        "LmctlLatencyP95High": [expect(rules, "LmctlLatencyP95High", labels, "4.875s")],
        "LmctlLatencyP99High": [expect(rules, "LmctlLatencyP99High", labels, "4.975s")],
        "LmctlTimeToFirstTokenHigh": [expect(rules, "LmctlTimeToFirstTokenHigh", labels, "975ms")]}))
    fast = {**_histogram("lmctl_request_latency_seconds", {"0.5": "0+10x30", "1": "0+10x30", "2.5": "0+10x30",
                                                           "5": "0+10x30", "+Inf": "0+10x30"}, endpoint="completions"),
            **_histogram("lmctl_time_to_first_token_seconds", {"0.5": "0+10x30", "1": "0+10x30", "+Inf": "0+10x30"}),
            # /metrics scrapes may be slow: they are not completions, so not in the SLO
            **_histogram("lmctl_request_latency_seconds", {"5": "0x30", "+Inf": "0+10x30"}, endpoint="metrics")}
    _ok(unit_test(rules, fast, "30m", {"LmctlLatencyP95High": [], "LmctlLatencyP99High": [],
                                       "LmctlTimeToFirstTokenHigh": []}))
    # slow for only 5 minutes: under `for: 10m`, no alert yet
    brief = _histogram("lmctl_request_latency_seconds", {"0.5": "0x30", "1": "0x30", "2.5": "0x30",
                                                        "5": "0+10x30", "+Inf": "0+10x30"}, endpoint="completions")
    _ok(unit_test(rules, brief, "5m", {"LmctlLatencyP95High": []}))


@needs_promtool
@pytest.mark.parametrize("first", ["0x10 1x20", "_x10 1x20"], ids=["increment", "new-series"])
def test_event_alerts_fire_on_one_event(rules: Path, first: str) -> None:
    """A counter that goes 0 -> 1, and one exported only from its first increment (at 1)."""
    canary = {"model": M, "version": "2"}
    quota = {"model": M, "version": V, "key": "team-a"}  # model and version: the deployment's, fixed
    series = {f'lmctl_canary_rollbacks_total{{model="{M}", version="2"}}': first,
              f'lmctl_model_reloads_total{{model="{M}", version="3", outcome="refused"}}': first,
              f'lmctl_model_reloads_total{{model="{M}", version="2", outcome="swapped"}}': first,
              f'lmctl_quota_refusals_total{{key="team-a", reason="tokens_per_day"}}': first,
              f'lmctl_quota_refusals_total{{key="team-b", reason="tokens"}}': first,  # per minute: no alert
              'lmctl_canary_rollbacks_total{model="other", version="9"}': first}  # another deployment's
    _ok(unit_test(rules, series, "15m", {
        "LmctlCanaryRolledBack": [expect(rules, "LmctlCanaryRolledBack", canary)],
        "LmctlReloadRefused": [expect(rules, "LmctlReloadRefused", {"model": M, "version": "3"})],
        "LmctlQuotaExhausted": [expect(rules, "LmctlQuotaExhausted", quota)]}))
    # nothing happened for a whole window: quiet again
    _ok(unit_test(rules, series, "29m", {"LmctlCanaryRolledBack": [], "LmctlReloadRefused": [], "LmctlQuotaExhausted": []}))


def test_operations_page_documents_every_slo_key_and_its_example_loads(tmp_path: Path) -> None:
    page = (Path(__file__).parent.parent / "docs" / "operations.md").read_text(encoding="utf-8")
    section = page.split("## SLO alerts")[1].split("\n## ")[0]
    missing = [key for key in SloConfig.model_fields if f"`{key}`" not in section]
    assert not missing, f"SLO keys missing from docs/operations.md: {missing}"
    example = next(block for block in re.findall(r"```yaml\n(.*?)```", section, re.S) if "availability:" in block)
    path = tmp_path / "slo.yaml"
    path.write_text(example)
    assert load_slo(path).alert_labels == {"team": "ml"}
    for name in BURNS + ["LmctlLatencyP95High", "LmctlQuotaExhausted"]:
        assert f"`{name}`" in section
