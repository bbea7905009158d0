"""Ranks agree on each operation before it runs: hpcaccel.torch's engine, one round per
operation, in submission order, on the engine's communicator and thread.

Horovod matches operations across ranks by name in a coordinator. Here each operation is
a fixed-length fingerprint d (descriptor(): 64-bit hashes of its kind and fields, the
dtypes, shapes, op and root, and of its name), and one round is one small allreduce with
bitwise OR of (d, ~d, joined ranks' bits). All ranks sent the same d exactly when no bit
is set in both halves: a bit that differs between two ranks' d is 1 in one rank's d and in
the other's ~d. Every rank reads the same result, so all of them take the same branch:

  * mismatch: every rank gathers the readable descriptions and the operation fails on
    every rank with one message naming the ranks (nothing moves; the next round is clean);
  * agreed, no rank joined: the operation runs;
  * agreed, some ranks joined (hvd.join(): a joined rank sends zeros and its bit): the
    lowest rank that did not join broadcasts what joined ranks need to take part (the
    operation's `join_spec()`), they take part with zeros, as Horovod's joined ranks do;
    an operation Horovod refuses with joined ranks (allgather, broadcast, ...) fails on
    the ranks that submitted it, and the joined ranks wait on;
  * every rank joined: join() returns on every rank, with the rank that joined last.

Two operations that differ get the same fingerprint only where two 64-bit hashes collide
(about 2^-64 per differing part). The hash of a kind and its fields is made once per
operation layout (`fields_hash`: a script repeats the same shapes), the name's per call.

Every channel of a script goes through these rounds: the tensor collectives, the control
plane's values and objects (control_ops.py) and each step's gradient exchange of a
DistributedOptimizer (exchange.py; its buckets then move on the reducer's own thread). So
a rank in another collective than the others is an error on every rank, whatever the
channel, never a hang.

Cross-rank invariants:
  * Every rank takes part in every round, joined or not, and rounds are numbered alike on
    every rank; a rank that left (departure.py) after n rounds fails a peer's round n+1.
  * Rank order: a round where several ranks joined counts the highest of them as the last
    to join (Horovod's coordinator reads joins in rank order within a cycle).
"""
from __future__ import annotations

import hashlib

DESCRIPTOR_BYTES = 24  # three 64-bit words: kind and fields, name, a constant 1
_MASK = (1 << 8 * DESCRIPTOR_BYTES) - 1
_LAYOUTS: dict = {}    # an operation layout's key -> the hash of its kind and fields
_MAX_LAYOUTS = 4096    # scripts with ever new shapes start over rather than grow


def hash64(text: str) -> int:
    """A 64-bit hash of `text`, the same in every process (Python's hash() is not)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def fields_hash(kind: str, key, fields) -> int:
    """hash64 of kind and fields, made once per `key` (hashable; equal keys must mean
    equal fields: the tensors' dtypes and shapes, op, factors); fields: a function making
    them. key None: not kept."""
    h = _LAYOUTS.get(key) if key is not None else None
    if h is None:
        h = hash64(repr((kind, fields())))
        if key is not None:
            if len(_LAYOUTS) >= _MAX_LAYOUTS:
                _LAYOUTS.clear()
            _LAYOUTS[key] = h
    return h


def fingerprint(what: int, name: str) -> bytes:
    """The fingerprint of an operation whose kind and fields hash to `what`, named `name`.
    Never all zeros (a joined rank's contribution)."""
    return (what | hash64(name) << 64 | 1 << 128).to_bytes(DESCRIPTOR_BYTES, "little")


def descriptor(kind: str, name: str, fields: list) -> bytes:
    """Fixed-length fingerprint of an operation; equal on two ranks iff they agree on kind,
    name and `fields` (dtype names, shapes, op, root, factors as strings/ints), but for
    64-bit hash collisions. Never all zeros (a joined rank's contribution)."""
    return fingerprint(hash64(repr((kind, fields))), name)


def mismatch_message(descriptions: list[str]) -> str:
    """Every rank's description grouped: which ranks asked for what."""
    groups: dict[str, list[int]] = {}
    for r, text in enumerate(descriptions):
        groups.setdefault(text, []).append(r)
    parts = [f"rank(s) {ranks_text(ranks)}: {text}" for text, ranks in groups.items()]
    hint = ("; a rank with fewer batches than the others calls hvd.join() when it runs out"
            if len(groups) > 1 and any(t.startswith("gradient exchange") for t in groups) else "")
    return ("ranks disagree about a collective (all ranks must call the same operations in "
            "the same order, with the same names, dtypes, shapes, op and root): "
            + "; ".join(parts) + hint)


def ranks_text(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8]))
    return shown + (f" (+{len(ranks) - 8} more)" if len(ranks) > 8 else "")


JOINED = "join (this rank ran out of data and called hvd.join())"


class Rounds:
    """The agreement rounds of one engine. Whichever thread holds the engine (engine.py)
    calls them; every method collective.

    A round may be left pending (`post`): its allreduce started, its outcome read by the
    next round's caller or `settle()`. Every rank posts and settles the same rounds in the
    same order (rounds are numbered alike), so the outcome's follow-ups (the descriptions
    gathered on a mismatch) still match across ranks."""

    def __init__(self, comm, stall):
        """stall: waits for a round's request (engine.StallCheck)."""
        from mpi4py import MPI

        self.comm, self.stall = comm, stall
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.everyone = (1 << self.size) - 1
        # a round's message, as bytes (bitwise or): d, ~d, then one bit per rank (joined)
        bits = (self.size + 63) // 64 * 8
        self._none_joined = bytes(bits)
        self._joined_alone = bytes(2 * DESCRIPTOR_BYTES) + (1 << self.rank).to_bytes(bits, "little")
        self._reduce = (MPI.IN_PLACE, MPI.BYTE, MPI.BOR)
        self.count = 0         # rounds so far (departure.py's "rounds" channel)
        self.joined = 0        # bit r: rank r has joined (since the last completed join)
        self.last_joined = -1
        self._pending = None   # (op, request, buffer, number) of a posted round

    def _start(self, d):
        """Start a round; d None: this rank has joined. (request, buffer, number)."""
        if d is None:
            buf = bytearray(self._joined_alone)
        else:
            inverse = (int.from_bytes(d, "little") ^ _MASK).to_bytes(DESCRIPTOR_BYTES, "little")
            buf = bytearray(d + inverse + self._none_joined)
        self.count += 1
        in_place, byte, bor = self._reduce
        return self.comm.Iallreduce(in_place, [buf, byte], op=bor), buf, self.count

    def _end(self, request, buf, number: int, what) -> tuple[bool, int]:
        """(agreed, joined ranks' bits) of a started round, once complete."""
        self.stall.wait(request, what, number, buf)
        n = DESCRIPTOR_BYTES
        agreed = not (int.from_bytes(buf[:n], "little") & int.from_bytes(buf[n:2 * n], "little"))
        joined = int.from_bytes(buf[2 * n:], "little")
        if joined != self.joined:
            newly = joined & ~self.joined
            if newly:
                self.last_joined = newly.bit_length() - 1
            self.joined = joined
        return agreed, joined

    def _spec(self, mine, joined: int):
        """What the joined ranks need, from the lowest rank that has not joined."""
        root = next(r for r in range(self.size) if not joined >> r & 1)
        return self.comm.bcast(mine if self.rank == root else None, root=root)

    def _outcome(self, op, agreed: bool, joined: int) -> str | None:
        if not agreed:
            return mismatch_message(self.comm.allgather(op.describe()))
        if not joined:
            return op.after_agree(self.comm)
        if self._spec(op.join_spec(), joined) is None:
            who = [r for r in range(self.size) if joined >> r & 1]
            return (f"{op.describe()} is not supported while rank(s) {ranks_text(who)} have "
                    f"joined (hvd.join()): as in Horovod, only allreduces, barriers and "
                    f"the gradient exchange run with joined ranks")
        return None

    def settle(self) -> str | None:
        """The outcome of the pending round, if any: None, or the error of its operation."""
        if self._pending is None:
            return None
        op, request, buf, number = self._pending
        self._pending = None
        agreed, joined = self._end(request, buf, number, op.describe)
        problem = self._outcome(op, agreed, joined)
        return None if problem is None else f"{op.describe()}: {problem}"

    def post(self, op) -> str | None:
        """For a rank that has not joined: start `op`'s round and leave it pending (an
        operation that needs nothing from it: the gradient exchange once its buckets are
        done). The previous pending round's error, if any (then nothing is started)."""
        problem = self.settle()
        if problem is None:
            self._pending = (op, *self._start(op.descriptor()))
        return problem

    def agree(self, op) -> str | None:
        """For a rank that has not joined: None when `op` runs now (every rank agreed;
        joined ranks take part with zeros), else the error it fails with on every rank
        that submitted it."""
        problem = self.settle()
        if problem is not None:
            return problem
        request, buf, number = self._start(op.descriptor())
        agreed, joined = self._end(request, buf, number, op.describe)
        return self._outcome(op, agreed, joined)

    def join(self, take_part) -> int:
        """For a rank that joined: take part in what the others run (take_part(spec), with
        zeros) until every rank has joined; then the rank that joined last."""
        problem = self.settle()
        if problem is not None:
            raise RuntimeError(problem)
        while True:
            agreed, joined = self._end(*self._start(None), "join")
            if not agreed:
                self.comm.allgather(JOINED)
                continue
            if joined == self.everyone:
                last, self.joined, self.last_joined = self.last_joined, 0, -1
                return last
            spec = self._spec(None, joined)
            if spec is not None:
                take_part(spec)
