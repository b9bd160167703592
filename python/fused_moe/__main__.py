import sys

from fused_moe.cli import main

sys.exit(main())
