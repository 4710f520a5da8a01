import sys

from gqa_uptrain.cli import main

sys.exit(main())
