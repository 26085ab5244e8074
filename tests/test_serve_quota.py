"""The keys file and the quota store on their own: parsing, hashing, token buckets, budgets, processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmctl.errors import BadInputError
from lmctl.serve.keys import Keyring, add_key, digest, load_keyring
from lmctl.serve.quota import QuotaStore, go_duration
from lmctl.serve.settings import KeyLimits

T0 = 1_800_000_000.0  # a fixed clock: 2027-01-15 08:00 UTC


def test_go_durations_as_openai_writes_them() -> None:
    assert [go_duration(s) for s in (0, 0.0201, 1, 8.64, 60, 360, 3723)] == \
        ["0s", "21ms", "1s", "8.64s", "1m0s", "6m0s", "1h2m3s"]


def test_one_key_per_line_and_the_env_keep_working(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = tmp_path / "keys.txt"
    old.write_text("# team keys\nalpha-key\n\nbeta-key\n")
    ring = load_keyring(old)
    assert [e.name for e in ring.entries] == ["key-1", "key-2"]  # by place: nothing of the secret in a label
    assert ring.identify("beta-key") is ring.entries[1] and ring.identify("gamma") is None
    assert ring.entries[0].requests_per_minute is None  # unlimited, as before
    monkeypatch.setenv("LMCTL_API_KEYS", "one,two")
    assert load_keyring(None).identify("two") is not None


def test_yaml_keys_file_errors_name_the_field_and_never_echo_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - name: a\n    sha256: lmctl-pasted-the-secret-here\n")
    with pytest.raises(BadInputError) as caught:
        load_keyring(path)
    assert "keys.0.sha256" in str(caught.value) and "pasted" not in str(caught.value)
    path.write_text(f"keys:\n  - {{name: a, sha256: {'a' * 64}}}\n  - {{name: a, sha256: {'b' * 64}}}\n")
    with pytest.raises(BadInputError, match="duplicate key names"):
        load_keyring(path)


def test_add_key_appends_an_entry_with_the_hash_only(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    secret, entry = add_key(path, "team-a", KeyLimits(requests_per_minute=5))
    secret_b, _ = add_key(path, "team-b", KeyLimits())
    text = path.read_text()
    assert secret not in text and secret_b not in text and digest(secret) in text
    ring = load_keyring(path)
    assert ring.identify(secret) == entry and ring.identify(secret_b).name == "team-b"  # type: ignore[union-attr]
    assert len(secret) > 40  # 256 random bits, base64: why a plain sha256 suffices at rest


def test_token_bucket_refills_evenly_and_refusals_charge_nothing(tmp_path: Path) -> None:
    store, limits = QuotaStore(tmp_path / "q.sqlite"), KeyLimits(requests_per_minute=2, tokens_per_minute=100)
    first = store.admit("k", limits, 30, now=T0)
    assert first.refusal is None and first.headers()["x-ratelimit-remaining-requests"] == "1"
    assert first.headers()["x-ratelimit-remaining-tokens"] == "70"
    assert store.admit("k", limits, 30, now=T0).refusal is None
    third = store.admit("k", limits, 30, now=T0 + 6)  # 6 s refill 0.2 requests: not enough for one
    assert third.refusal is not None and third.refusal.reason == "requests"
    assert third.refusal.retry_after_s == pytest.approx(24)  # 0.8 request more at 1 per 30 s
    assert third.headers()["x-ratelimit-reset-requests"] == "54s"
    assert store.admit("k", limits, 30, now=T0 + 30).refusal is None  # refused requests did not count
    too_big = store.admit("k", limits, 101, now=T0 + 600)
    assert too_big.refusal is not None and too_big.refusal.reason == "too_large" and not too_big.refusal.retry


def test_settling_gives_back_the_unused_reservation(tmp_path: Path) -> None:
    store, limits = QuotaStore(tmp_path / "q.sqlite"), KeyLimits(tokens_per_minute=100, tokens_per_day=150)
    verdict = store.admit("k", limits, 90, now=T0)  # prompt + max_tokens reserved
    assert store.admit("k", limits, 20, now=T0).refusal is not None
    store.settle(verdict.ticket, 12)  # type: ignore[arg-type]  # the request really used 12
    store.settle(verdict.ticket, 0)  # type: ignore[arg-type]  # once only
    assert store.look("k", limits, now=T0).headers()["x-ratelimit-remaining-tokens"] == "88"
    assert store.admit("k", limits, 80, now=T0).refusal is None  # the day has 150 - 12 - 80 = 58 left
    spent = store.admit("k", limits, 60, now=T0 + 120)
    assert spent.refusal is not None and spent.refusal.reason == "tokens_per_day" and not spent.refusal.retry
    assert spent.refusal.retry_after_s == pytest.approx(16 * 3600 - 120)  # until 00:00 UTC
    assert store.admit("k", limits, 60, now=T0 + 16 * 3600).refusal is None  # a new day


def test_two_processes_share_one_limit_exactly(tmp_path: Path) -> None:
    """Two server processes (workers) admitting against one file at once never admit more than the limit."""
    db = tmp_path / "q.sqlite"
    QuotaStore(db)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from lmctl.serve.quota import QuotaStore
        from lmctl.serve.settings import KeyLimits
        store, limits = QuotaStore(Path({str(db)!r})), KeyLimits(requests_per_minute=50)
        print(sum(store.admit("k", limits, 1, now={T0}).refusal is None for _ in range(40)))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    admitted = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(admitted) == 50 and min(admitted) >= 10, admitted  # both took part, exactly the limit in all
