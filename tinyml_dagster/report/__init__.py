"""The report: the paper's figures reproduced in this system, and detection quality (docs/results.md).

`make report` runs `python -m tinyml_dagster.report` (tinyml_dagster/report/generate.py's main); `inline` draws the
Dagster assets' plots of their own run's data.
"""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
