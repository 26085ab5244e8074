"""API keys with a name and limits: the keys file, its hashed secrets, and who a request is.

The keys file (`--api-keys-file`) takes two forms:

- YAML, a mapping with a `keys` list; each entry has a `name` (what logs and metrics show), the
  key's `sha256` (the secret itself is never stored) and optional `requests_per_minute`,
  `tokens_per_minute` and `tokens_per_day` limits (absent: unlimited);
- the older one key per line (`#` comments), each key unlimited and named by its place: `key-1`,
  `key-2`, ... (not by a piece of its hash: /metrics is open, and a hash prefix would let anyone
  test guesses of a weak hand-made key offline). `LMCTL_API_KEYS` (comma-separated) works the
  same way.

Why a plain sha256 and not bcrypt/argon2: those are slow on purpose because passwords are
guessable; an API key made by `lmctl keys add` is 256 random bits, so no guess list exists and a
preimage search of sha256 over 2^256 is out of reach, while a slow hash would cost every request
tens of milliseconds. The server hashes the presented key and compares digests in constant time
against every entry. Hand-written because no library keeps API keys with quotas for FastAPI.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmctl.errors import BadInputError
from lmctl.serve.settings import KeyLimits

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
KEY_PREFIX = "lmctl-"


class KeyEntry(KeyLimits):
    """One key of the YAML keys file."""

    name: str = Field(..., pattern=_NAME, description="The key's identity in logs and metrics.")
    sha256: str = Field(..., pattern=_HEX64.pattern, description="Hex sha256 of the secret (`lmctl keys hash`).")


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    """256 random bits, URL-safe, with a prefix that secret scanners and people recognise."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class Keyring:
    """The configured keys; `identify` maps a presented secret to its entry."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        names = [e.name for e in entries]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise BadInputError(f"API keys file: duplicate key names {dup}")
        self.entries = entries
        self._digests = [(bytes.fromhex(e.sha256), e) for e in entries]

    @classmethod
    def from_secrets(cls, keys: list[str]) -> "Keyring":
        unique = list(dict.fromkeys(keys))
        return cls([KeyEntry(name=f"key-{i}", sha256=digest(k)) for i, k in enumerate(unique, 1)])

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def limited(self) -> bool:
        """Whether any key has a limit (else no quota store is needed)."""
        return any(e.requests_per_minute or e.tokens_per_minute or e.tokens_per_day for e in self.entries)

    def identify(self, secret: str) -> KeyEntry | None:
        given = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        found = None
        for stored, entry in self._digests:  # every entry, always: timing says nothing about which matched
            if hmac.compare_digest(given, stored):
                found = entry
        return found


def _parse_yaml(path: Path, text: str) -> KeysFile | None:
    """The YAML form, or None when the file is the one-key-per-line form."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict) or "keys" not in data:
        return None
    try:
        return KeysFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        # the message only: pydantic's input echo could be a secret pasted where a hash belongs
        raise BadInputError(f"API keys file {path}: {where}: {first['msg']}") from None


def load_keyring(keys_file: Path | None) -> Keyring:
    """Keys from --api-keys-file (YAML or one per line) or LMCTL_API_KEYS (comma-separated)."""
    if keys_file is None:
        raw = os.environ.get("LMCTL_API_KEYS", "").split(",")
    else:
        if not keys_file.is_file():
            raise BadInputError(f"API keys file not found: {keys_file}")
        text = keys_file.read_text(encoding="utf-8")
        parsed = _parse_yaml(keys_file, text)
        if parsed is not None:
            return Keyring(parsed.keys)
        raw = text.splitlines()
    return Keyring.from_secrets([k.strip() for k in raw if k.strip() and not k.strip().startswith("#")])


def add_key(keys_file: Path, name: str, limits: KeyLimits) -> tuple[str, KeyEntry]:
    """Make a new secret and append its entry (hash and limits) to the YAML keys file, atomically.
    Returns the secret, which exists nowhere else afterwards."""
    from lmctl.atomic import write_text_atomic

    current = KeysFile()
    if keys_file.exists():
        parsed = _parse_yaml(keys_file, keys_file.read_text(encoding="utf-8"))
        if parsed is None:
            raise BadInputError(f"{keys_file} is not a YAML keys file (a `keys:` list); "
                                "convert it first, see docs/operations.md")
        current = parsed
    secret = new_secret()
    try:
        entry = KeyEntry(name=name, sha256=digest(secret), **limits.model_dump())
    except ValidationError as exc:
        raise BadInputError(f"key name {name!r}: {exc.errors()[0]['msg']}") from None
    Keyring([*current.keys, entry])  # refuses a duplicate name
    current.keys.append(entry)
    # name and hash first, then the limits: the order a person reads an entry in
    rows = [{"name": e.name, "sha256": e.sha256, **e.model_dump(exclude={"name", "sha256"}, exclude_none=True)}
            for e in current.keys]
    body = yaml.safe_dump({"keys": rows}, sort_keys=False)
    write_text_atomic(keys_file, "# lmctl API keys: secrets are kept only as sha256 (docs/operations.md)\n" + body)
    keys_file.chmod(0o600)
    return secret, entry
