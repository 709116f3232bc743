"""ringproxy: an edge reverse proxy for ring-based progressive delivery."""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os

if _os.environ.get("RINGPROXY_PURE_PYTHON"):
    # The interpreted data plane even where the compiled one is installed (proxy/compiled.py).
    from proxy.compiled import prefer_source as _prefer_source

    _prefer_source()
