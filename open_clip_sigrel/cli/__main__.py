import sys

from open_clip_sigrel.cli import main

sys.exit(main())
