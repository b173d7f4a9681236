"""The other end of a real gloo link for tests/test_dist_units.py, in its own process.

python tests/link_peer.py PORT echo N   receive N bundles on tag 4, send each back on tag 5
python tests/link_peer.py PORT silent   build the link, then say nothing until killed
python tests/link_peer.py PORT last-and-leave   send one bundle on tag 5, then leave together
python tests/link_peer.py PORT last-and-exit    send one bundle on tag 5, then exit at once
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from mach_lightning.dist.transport import Link
from mach_lightning.dist.worker import meet


def main() -> None:
    port, mode = int(sys.argv[1]), sys.argv[2]
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    link = Link(store, 1, 0, timeout_s=30)
    if mode == "silent":
        time.sleep(60)
        return
    if mode.startswith("last-and-"):  # a component process's last step, then its exit
        link.send_bundle(5, {"step": 11}, [torch.arange(1000.0)])
        if mode == "last-and-leave":
            meet(store, 1, [0], "finished", timeout_s=30)
        return
    for _ in range(int(sys.argv[3])):
        header, tensors = link.recv_bundle(4)
        link.send_bundle(5, header, tensors)
        link.flush()


if __name__ == "__main__":
    main()
