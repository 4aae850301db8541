import sys

from kernelhub.cli import main

if __name__ == "__main__":  # not when a spawned worker re-imports this module (kernelhub.local_world)
    sys.exit(main())
