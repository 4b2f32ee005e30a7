"""python -m tinyml_dagster.link_service"""

import sys

from tinyml_dagster.link_service.cli import main

sys.exit(main())
