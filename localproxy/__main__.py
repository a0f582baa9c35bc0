from localproxy.cli import main

raise SystemExit(main())
