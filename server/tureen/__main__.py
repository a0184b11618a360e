from tureen.cli import main

raise SystemExit(main())
