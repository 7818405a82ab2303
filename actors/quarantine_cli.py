"""``livetrain quarantine``: list the quarantine, re-ingest entries. Pure: no Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from livetrain.actors.manifest import Manifest
from livetrain.actors.quarantine import list_quarantine, reingest
from livetrain.config import Config


def quarantine_command(cfg: Config, name: str | None, everything: bool) -> int:
    if not Path(cfg.state_dir).is_dir():  # a mistyped path: say so, and do not create a manifest there
        print(f"livetrain: no state directory at {cfg.state_dir}", file=sys.stderr)
        return 1
    entries = list_quarantine(cfg.state_dir)
    if name is None and not everything:
        for e in entries:
            rows = "whole shard" if e.rows is None else f"{e.rows} rows"
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(e.reasons.items())) if e.rows is not None else e.error
            print(f"{e.shard}\t{rows}\t{reasons}\t{e.path}")
        print(json.dumps({"entries": len(entries), "rows": sum(e.rows or 0 for e in entries),
                          "whole_shards": sum(e.rows is None for e in entries)}))
        return 0
    chosen = entries if everything else [e for e in entries if e.shard == name]
    if not chosen:
        print(f"livetrain: nothing in quarantine{'' if everything else f' for {name!r}'}", file=sys.stderr)
        return 0 if everything else 1
    with Manifest(cfg.state_dir) as manifest:
        for e in chosen:
            try:
                print(reingest(cfg.state_dir, cfg.landing_dir, e, manifest))
            except ValueError as err:  # ManifestError too: a clear line, not a traceback
                print(f"livetrain: {e.shard}: {err}", file=sys.stderr)
                return 1
    return 0
