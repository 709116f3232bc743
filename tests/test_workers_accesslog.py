"""Several worker processes writing access-log lines to one pipe (``path: "-"`` under a
process manager): no line is ever cut by another process's write.  Two real processes,
one real pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

WRITER = """
import asyncio, sys
from proxy.dataplane.accesslog import AccessLog

async def main() -> None:
    log = AccessLog("-")
    for i in range(1500):
        log.log({"who": sys.argv[1], "i": i, "pad": "x" * 900})
        if i % 100 == 0:
            await asyncio.sleep(0)
    log.close()

asyncio.run(main())
"""


def test_lines_of_two_processes_sharing_a_pipe_never_interleave() -> None:
    read, write = os.pipe()
    try:
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, who], stdout=write,
                                    stderr=subprocess.DEVNULL) for who in ("a", "b")]
    finally:
        os.close(write)
    data = bytearray()
    while chunk := os.read(read, 1 << 16):  # until both writers are done
        data += chunk
    os.close(read)
    for writer in writers:
        assert writer.wait(timeout=60) == 0
    lines = data.decode().splitlines()
    assert len(lines) == 3000
    seen = [json.loads(line) for line in lines]  # each one whole: a JSON object
    for who in ("a", "b"):
        assert [e["i"] for e in seen if e["who"] == who] == list(range(1500))
