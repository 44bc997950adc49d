import sys

from simcrop.eval.cli import main

sys.exit(main())
