"""Comparing what a store (or run) was made from with what is asked for now, and saying what differs."""

from __future__ import annotations

import json
from typing import Any, Sequence

from .layout import StoreLayout


def compare_fingerprints(existing: dict, wanted: dict) -> list[str]:
    """Names of the fingerprint fields whose values differ (missing counts as different)."""
    keys = sorted(set(existing) | set(wanted))
    return [k for k in keys if existing.get(k) != wanted.get(k)]


def describe_difference(existing: dict, wanted: dict, keys: Sequence[str]) -> str:
    """One line per differing field (per sub-field of a dict field): what the store has, what is asked now."""
    def short(v: Any) -> str:
        s = json.dumps(v, sort_keys=True, default=str)
        return s if len(s) <= 80 else s[:77] + "..."

    lines = []
    for k in keys:
        a, b = existing.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):  # name the differing sub-fields
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    lines.append(f"  {k}.{sub}: store has {short(a.get(sub))}, now {short(b.get(sub))}")
        else:
            lines.append(f"  {k}: store has {short(a)}, now {short(b)}")
    return "\n".join(lines)


def difference_line(existing: dict, wanted: dict, existing_label: str = "store has") -> str | None:
    """None when the fingerprints agree; else the differing fields on one line, `existing_label`
    naming the first side ("field: run has X, now Y; ...")."""
    differ = compare_fingerprints(existing, wanted)
    if not differ:
        return None
    lines = describe_difference(existing, wanted, differ).splitlines()
    return "; ".join(line.strip().replace(": store has ", f": {existing_label} ", 1) for line in lines)


def describe_layout_difference(existing: StoreLayout, wanted: StoreLayout) -> str:
    """`shard_size differ: store {...}, now {...}` for two layouts that differ."""
    have, want = existing.to_json(), wanted.to_json()
    differ = [k for k, v in want.items() if have.get(k) != v]
    return (f"{', '.join(differ)} differ: store "
            f"{ {k: have[k] for k in differ} }, now "
            f"{ {k: want[k] for k in differ} }")
