from wsi_ncmi.cli import main
import sys
sys.exit(main())
