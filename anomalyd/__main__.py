import sys

from anomalyd.cli import main

sys.exit(main())
