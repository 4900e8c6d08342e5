import sys

from kvmguest.front.cli import main

sys.exit(main())
