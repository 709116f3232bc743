"""``workers: N``: one supervisor (control plane) and N worker processes (data plane).

``proxy.workers.supervisor`` runs the rollout, the admin listener and the reloads on the
merged evidence of all workers; ``proxy.workers.worker`` serves clients on a shared port
(SO_REUSEPORT) and applies the supervisor's decisions; ``proxy.workers.channel`` is how
they talk; ``proxy.workers.deltas`` is what a worker reports and how it is added in.
"""
