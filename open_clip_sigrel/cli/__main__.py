import sys

from open_clip_sigrel.cli import main

if __name__ == "__main__":
    sys.exit(main())
