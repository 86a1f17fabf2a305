from lorakit_ext.cli import main

raise SystemExit(main())
