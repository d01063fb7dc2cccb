"""A sweep's run folders read back with json alone (no ibbench), for tests that check ibbench's reading of them."""

from __future__ import annotations

import json
from pathlib import Path


def raw_runs(root: Path) -> list[dict]:
    """config, summary and metrics of every run folder under root, in folder order."""
    return [
        {
            "run_id": folder.name,
            "config": json.loads((folder / "config.json").read_text()),
            "summary": json.loads((folder / "summary.json").read_text()),
            "metrics": [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()],
        }
        for folder in sorted(p for p in root.iterdir() if (p / "config.json").exists())
    ]
