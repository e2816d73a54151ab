import sys

from tb_reranker.cli import main

sys.exit(main())
