"""Links between processes: one 2-rank gloo process group per pair, from one shared TCPStore.

There is no global world for training traffic. Each link is its own `ProcessGroupGloo` of size 2,
built under its own `PrefixStore` (`link/<a>-<b>/g<generation>`) of the coordinator's store, so a
link can be rebuilt (a new generation) without touching the others. A *bundle* is what one node
sends another on one step: a list of messages. On the wire it is one buffer: a header (the
messages' kinds, batch ids, senders, steps, weight versions, send time, and each tensor's shape and
dtype, pickled) in a fixed-size slot, then the tensors' bytes. Every wait is bounded by the link's
timeout: a peer that hangs is named, never waited on for gloo's default 30 minutes.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import struct
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

HEADER_SLOT = 2048  # bytes: the least room for a bundle's header (a larger one gets a larger slot)
PREFIX = struct.Struct("<qqq")  # a bundle's header length, header slot and total size, in bytes


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
    wait_s: float = 0.0  # time spent blocked: receives, and sends waiting for room


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
        self._unfinished: list = []  # this step's sends, waited on at its end (flush)
        self._posted: dict[int, tuple] = {}  # tag -> the receive posted for its next bundle
        self._expected: dict[int, int] = {}  # tag -> the size the peer has posted for
        self._sending: dict[int, tuple] = {}  # tag -> (its last send, the buffer it sends)

    # ----- raw tensors -----
    def _send(self, tensor: torch.Tensor, tag: int) -> None:
        self._unfinished.append(self.group.send([tensor], self.peer_rank, tag))

    def _recv(self, tensor: torch.Tensor, tag: int, timed: bool = True) -> torch.Tensor:
        start = time.perf_counter()
        try:
            self.group.recv([tensor], self.peer_rank, tag).wait(self.timeout)
        except RuntimeError as err:
            raise PeerError(self.peer, f"nothing received within {self.timeout}", err) from None
        if timed:
            self.stats.wait_s += time.perf_counter() - start
        return tensor

    def flush(self) -> None:
        """Wait for this step's sends (each bounded by the timeout)."""
        self.settle(0)

    def settle(self, limit: int) -> None:
        """Wait for the oldest sends until at most `limit` are in flight: a bounded queue. (A gloo
        work only reports completion once waited on, so the oldest are waited on, in order.)"""
        start = time.perf_counter()
        while len(self._unfinished) > limit:
            work = self._unfinished.pop(0)
            try:
                work.wait(self.timeout)
            except RuntimeError as err:
                raise PeerError(self.peer, "a send did not complete", err) from None
        self.stats.wait_s += time.perf_counter() - start  # a full queue: waiting on the peer

    # ----- bundles -----
    def send_bundle(self, tag: int, header: dict, tensors: list[torch.Tensor]) -> None:
        """Send a header and its tensors under `tag` (one tag per node link and direction, so
        bundles between the same two processes never overtake each other).

        A bundle is one buffer: a prefix (header length, slot size, total size), the pickled
        header in its slot, then the tensors' bytes. A gloo transfer starts once both sides
        have posted it, so the receiver posts the next bundle's receive ahead, sized as the
        bundle before (in lockstep a link carries the same shapes step after step); both sides
        know that size. A bundle of another size is announced first (a prefix alone, in the
        posted receive), then follows whole."""
        tensors = [t.detach().contiguous() for t in tensors]
        shapes = [(tuple(t.shape), t.dtype) for t in tensors]
        raw = pickle.dumps({**header, "sent_at": time.time(), "shapes": shapes})
        slot = max(HEADER_SLOT, -(-(PREFIX.size + len(raw)) // 8) * 8)
        offsets, total = _layout(shapes, slot)
        buffer = self._send_buffer(tag, total)
        head = PREFIX.pack(len(raw), slot, total) + raw
        memoryview(buffer.numpy())[: len(head)] = head  # a memcpy, no tensor ops
        for t, at in zip(tensors, offsets):
            _pack(buffer, at, t)
        expected = self._expected.get(tag, HEADER_SLOT)
        if expected != total:  # the posted receive only learns the size to expect
            announce = torch.zeros(expected, dtype=torch.uint8)
            announce[: PREFIX.size] = torch.frombuffer(
                bytearray(PREFIX.pack(0, slot, total)), dtype=torch.uint8
            )
            self._send(announce, tag)
        self._send(buffer, tag)
        self._sending[tag] = (self._unfinished[-1], buffer)
        self._expected[tag] = total
        self.stats.messages += 1
        self.stats.bytes += total

    def _send_buffer(self, tag: int, size: int) -> torch.Tensor:
        """The tag's send buffer, reused once its last send is done: a fresh large buffer per
        bundle costs more than the transfer (the allocator maps and faults its pages in)."""
        work, buffer = self._sending.pop(tag, (None, None))
        if buffer is None or buffer.numel() != size or not work.is_completed():
            return torch.empty(size, dtype=torch.uint8)  # (a gloo send is waited on once only)
        return buffer

    def _post(self, tag: int, size: int) -> None:
        buffer = torch.empty(size, dtype=torch.uint8)
        try:
            self._posted[tag] = (self.group.recv([buffer], self.peer_rank, tag), buffer)
        except RuntimeError as err:  # gloo refuses to post on a pair its peer has closed
            raise PeerError(self.peer, "its connection is closed", err) from None

    def recv_bundle(self, tag: int, timed: bool = True) -> tuple[dict, list[torch.Tensor]]:
        """The next bundle under `tag`; `timed`: its wait counts as this process waiting (not
        so for a helper thread's, which the process's loop does not wait on)."""
        if tag not in self._posted:
            self._post(tag, HEADER_SLOT)
        work, buffer = self._posted.pop(tag)
        start = time.perf_counter()
        try:
            work.wait(self.timeout)
        except RuntimeError as err:
            raise PeerError(self.peer, f"nothing received within {self.timeout}", err) from None
        if timed:
            self.stats.wait_s += time.perf_counter() - start
        _, _, total = PREFIX.unpack(memoryview(buffer.numpy())[: PREFIX.size])
        if total != buffer.numel():  # an announcement: the bundle follows
            buffer = self._recv(torch.empty(total, dtype=torch.uint8), tag, timed)
        view = memoryview(buffer.numpy())
        size, slot, _ = PREFIX.unpack(view[: PREFIX.size])
        header = pickle.loads(view[PREFIX.size : PREFIX.size + size])
        offsets, _ = _layout(header["shapes"], slot)
        tensors = [_view(buffer, at, s, d) for (s, d), at in zip(header["shapes"], offsets)]
        with contextlib.suppress(PeerError):  # a peer gone after its last bundle: this one counts
            self._post(tag, total)  # (a next receive posts again, and says the peer is gone)
        return header, tensors


def _layout(shapes: list, slot: int) -> tuple[list[int], int]:
    """Each tensor's byte offset in a bundle (after the header slot, 8-byte aligned), and the
    bundle's size."""
    offsets, at = [], slot
    for shape, dtype in shapes:
        offsets.append(at)
        nbytes = math.prod(shape) * dtype.itemsize
        at += -(-nbytes // 8) * 8
    return offsets, at


def _pack(buffer: torch.Tensor, at: int, t: torch.Tensor) -> None:
    """Copy tensor t into the bundle at byte `at`: through numpy where it has t's dtype (half the
    time of torch's copy_ for a 256 KB float32 tensor on one thread), else with copy_."""
    try:
        source = t.numpy().reshape(-1)
    except TypeError:  # bfloat16 and other dtypes numpy lacks
        _view(buffer, at, t.shape, t.dtype).copy_(t)
        return
    buffer.numpy()[at : at + source.nbytes].view(source.dtype)[:] = source


def _view(buffer: torch.Tensor, at: int, shape, dtype) -> torch.Tensor:
    size = math.prod(shape) * dtype.itemsize
    return buffer[at : at + size].view(dtype).view(shape)
