from tinyml_dagster.emulator.cli import main

raise SystemExit(main())
