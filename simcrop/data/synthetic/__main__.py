import sys

from simcrop.data.synthetic.cli import main

sys.exit(main())
