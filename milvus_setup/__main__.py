"""``python -m milvus_setup create|describe|drop|check --uri URI ...``."""

import sys

from milvus_setup.cli import main

sys.exit(main())
