import sys

from conceptseg_edge.cli import main

sys.exit(main())
