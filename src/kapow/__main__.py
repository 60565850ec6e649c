from kapow.cli import main

raise SystemExit(main())
