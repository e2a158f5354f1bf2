"""``python -m bench``: the proxy-overhead benchmark (bench/overhead.py), direct vs nginx vs
the proxy against a fast fake llama.cpp upstream. ``python -m bench.core`` is the other one,
against a real llama.cpp server."""

import sys

from bench.overhead import main

sys.exit(main())
