import sys

from dit_jax.cli import main

sys.exit(main())
