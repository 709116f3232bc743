"""Upstream health: active checks, passive outlier ejection, retries (issue #15).

``state`` and ``retry`` decide, without I/O or a clock (the pure core); ``checker`` sends
one active check; ``monitor`` applies the decisions to a live pool.
"""
