from olmocr.service.cli import main

raise SystemExit(main())
