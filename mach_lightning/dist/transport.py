"""Links between processes: one 2-rank gloo process group per pair, from one shared TCPStore.

There is no global world for training traffic. Each link is its own `ProcessGroupGloo` of size 2,
built under its own `PrefixStore` (`link/<a>-<b>/g<generation>`) of the coordinator's store, so a
link can be rebuilt (a new generation) without touching the others. A *bundle* is what one node
sends another on one step: a list of messages. On the wire it is a header (the messages' kinds,
batch ids, senders, steps, weight versions, send time, and each tensor's shape and dtype, pickled
into bytes) followed by the tensors themselves, raw. Every wait is bounded by the link's timeout:
a peer that hangs is named, never waited on for gloo's default 30 minutes.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


class PeerError(RuntimeError):
    """A peer process did not answer in time, or its connection broke."""

    def __init__(self, peer: int, what: str, cause: BaseException | None = None):
        detail = f": {cause}" if cause is not None else ""
        super().__init__(f"component process {peer}: {what}{detail}")
        self.peer = peer


@dataclass
class LinkStats:
    """What went over one link, for time/*, msgs/s and MB/s."""

    messages: int = 0
    bytes: int = 0
    wait_s: float = 0.0  # time spent blocked in receives
    sent: list = field(default_factory=list)  # pending sends (waited on at the end of a step)


class Link:
    """Process `me` to process `peer`: a 2-rank gloo group; rank 0 is the lower process id."""

    def __init__(self, store, me: int, peer: int, timeout_s: float, generation: int = 0):
        low, high = sorted((me, peer))
        prefix = dist.PrefixStore(f"link/{low}-{high}/g{generation}", store)
        self.me, self.peer, self.timeout = me, peer, timedelta(seconds=timeout_s)
        self.peer_rank = 0 if peer == low else 1
        try:
            self.group = dist.ProcessGroupGloo(prefix, 0 if me == low else 1, 2, self.timeout)
        except RuntimeError as err:
            raise PeerError(peer, f"no link within {timeout_s:g} s", err) from None
        self.stats = LinkStats()

    # ----- raw tensors -----
    def _send(self, tensor: torch.Tensor, tag: int) -> None:
        self.stats.sent.append(self.group.send([tensor], self.peer_rank, tag))

    def _recv(self, tensor: torch.Tensor, tag: int) -> torch.Tensor:
        start = time.perf_counter()
        try:
            self.group.recv([tensor], self.peer_rank, tag).wait(self.timeout)
        except RuntimeError as err:
            raise PeerError(self.peer, f"nothing received within {self.timeout}", err) from None
        self.stats.wait_s += time.perf_counter() - start
        return tensor

    def flush(self) -> None:
        """Wait for this step's sends (each bounded by the timeout)."""
        sent, self.stats.sent = self.stats.sent, []
        for work in sent:
            try:
                work.wait(self.timeout)
            except RuntimeError as err:
                raise PeerError(self.peer, "a send did not complete", err) from None

    # ----- bundles -----
    def send_bundle(self, tag: int, header: dict, tensors: list[torch.Tensor]) -> None:
        """Send a header and its tensors under `tag` (one tag per node link and direction, so
        bundles between the same two processes never overtake each other)."""
        tensors = [t.detach().contiguous() for t in tensors]
        header = {**header, "sent_at": time.time()}
        header["shapes"] = [(tuple(t.shape), t.dtype) for t in tensors]
        raw = torch.frombuffer(bytearray(pickle.dumps(header)), dtype=torch.uint8)
        self._send(torch.tensor([raw.numel()], dtype=torch.int64), tag)
        self._send(raw, tag)
        for t in tensors:
            self._send(t, tag)
        self.stats.messages += 1
        self.stats.bytes += raw.numel() + sum(t.numel() * t.element_size() for t in tensors)

    def recv_bundle(self, tag: int) -> tuple[dict, list[torch.Tensor]]:
        size = int(self._recv(torch.zeros(1, dtype=torch.int64), tag))
        raw = self._recv(torch.empty(size, dtype=torch.uint8), tag)
        header = pickle.loads(raw.numpy().tobytes())
        shapes = header["shapes"]
        tensors = [self._recv(torch.empty(shape, dtype=dtype), tag) for shape, dtype in shapes]
        return header, tensors

    def close(self) -> None:
        self.flush()
