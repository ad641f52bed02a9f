"""`python -m aoai_auth_proxy`: the same as the `aoai-auth-proxy` command."""

import sys

from .cli import main

sys.exit(main())
