"""Checks from outside the proxy's own traffic: Prometheus queries, webhooks, custom health
checks per ring, and the ``pre_advance`` / ``post_rollback`` gates (``runner``), their
results and how they join a verdict (``results``, pure), and PromQL validation for
``ringproxy check`` (``promql``)."""
