"""Build the demo's domain corpus from the Python language reference every Python ships.

`pydoc_data.topics` holds the text of the reference's topics (`help('FOR')` etc.). Topics
are split deterministically by name into train and held-out validation documents.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def split_topics(validation_share: float = 0.12, max_validation_chars: int = 3000) -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    train, validation = [], []
    for name in sorted(topics):
        bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        text = topics[name].strip()
        if bucket < validation_share:
            validation.append(text[:max_validation_chars])
        else:
            train.append(text)
    return train, validation


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".lmctl/demo")
    train, validation = split_topics()
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "validation.jsonl", validation)
    print(f"train: {len(train)} docs, {sum(map(len, train))} chars; validation: {len(validation)} docs, "
          f"{sum(map(len, validation))} chars", file=sys.stderr)
