"""One rollout shared by many ringproxy processes through Redis (``state.backend: redis``).

``store`` holds the keys and the Lua scripts (the one place either is written),
``evidence`` the pure merging of the members' published tallies, ``lease`` the leader
election, and ``member`` the asyncio shell that ties them to a ``Controller``.
"""
