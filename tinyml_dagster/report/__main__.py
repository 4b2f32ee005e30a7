"""`python -m tinyml_dagster.report`."""

from tinyml_dagster.report import main

main()
