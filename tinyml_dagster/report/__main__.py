"""`python -m tinyml_dagster.report`: regenerate docs/results.md and its figures."""

from tinyml_dagster.report.generate import main

main()
