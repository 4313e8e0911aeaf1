import sys

from wsi_ncmi.cli import main

sys.exit(main())
