import sys

from fedmutual.cli import main

sys.exit(main())
