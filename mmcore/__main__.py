import sys

from mmcore.cli import main

sys.exit(main())
