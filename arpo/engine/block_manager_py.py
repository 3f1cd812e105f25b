"""Pure-Python paged-KV block manager: the readable twin of the C++ one (csrc/block_manager.cpp).

Both twins follow the same rules step by step, so any sequence of calls gives identical block tables, slots,
copies and exceptions (tests/engine/test_block_manager_twins.py checks this). The rules:

* A fixed pool of `num_blocks` blocks of `block_size` token slots; slot = block_id * block_size + offset.
  Each sequence owns a block table covering ceil(num_tokens / block_size) blocks.
* Free blocks sit in one FIFO queue: a block is taken from the front and a released block joins the back
  (a freed sequence releases its table last block first), so cached prefixes are evicted least-recently-freed first.
* Prefix cache: a full block whose token ids are known gets a chain hash (it depends on the previous block's
  hash and on the block's tokens) and is entered in an index hash -> block. `allocate` shares leading full
  blocks found there (tokens are compared, so a hash collision cannot produce a false hit), even blocks whose
  owner freed them: free blocks keep their hash until taken from the queue. The block holding the last prompt
  token is never reused, so the caller always has at least one token to compute logits from. A newly
  registered block replaces an older block with the same hash in the index (the newest copy wins).
* Copy-on-write: `fork` shares blocks (ref counts + 1) and copies nothing. A block with ref count > 1 is
  never written: `append` first moves the writer onto a fresh block and reports (old, new) for the caller to
  copy. A registered block is never modified: writing into one the sequence owns alone removes it from the
  index (no copy); this only happens after a fork in the middle of a full block whose other owners are gone.
* Errors are raised before anything changes (see arpo/engine/errors.py).
"""
from collections import OrderedDict
from operator import index

from arpo.engine.errors import (
    DuplicateSequenceError,
    InvalidArgumentError,
    OutOfBlocksError,
    UnknownSequenceError,
)

_MASK = (1 << 64) - 1
ROOT_HASH = 0xCBF29CE484222325  # "previous hash" of a sequence's first block
_STEP_MUL = 0x9E3779B97F4A7C15


def chain_hash(prev: int, token_ids) -> int:
    """64-bit hash of one block given the previous block's hash; identical to arpo._C.chain_hash."""
    h = prev & _MASK
    for t in token_ids:
        h = ((h ^ (t & _MASK)) * _STEP_MUL) & _MASK
        h ^= h >> 32
    h ^= h >> 30  # splitmix64 finaliser: spread every bit over the whole word
    h = (h * 0xBF58476D1CE4E5B9) & _MASK
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & _MASK
    return h ^ (h >> 31)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Block:
    __slots__ = ("ref_count", "hash", "token_ids")

    def __init__(self):
        self.ref_count = 0
        self.hash = None  # set iff the prefix index maps this hash to this block
        self.token_ids = None  # the block's tokens while registered, to verify hits


class _Sequence:
    __slots__ = ("table", "num_tokens", "tokens", "hashes")

    def __init__(self, table, num_tokens, tokens, hashes):
        self.table = table
        self.num_tokens = num_tokens
        self.tokens = tokens  # the known leading token ids (all of them unless an append came without ids)
        self.hashes = hashes  # chain hash of each full block inside `tokens`


def _unknown(op: str, seq_id: int) -> UnknownSequenceError:
    return UnknownSequenceError(f"{op}: unknown sequence id {seq_id} (never allocated, or already freed)")


class BlockManagerPy:
    """Paged-KV block manager with prefix caching, fork and copy-on-write (pure Python)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise InvalidArgumentError(f"num_blocks={num_blocks} must be > 0")
        if block_size <= 0:
            raise InvalidArgumentError(f"block_size={block_size} must be > 0")
        self._num_blocks = int(num_blocks)
        self._block_size = int(block_size)
        self._caching = bool(enable_prefix_caching)
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free = OrderedDict.fromkeys(range(num_blocks))  # FIFO queue with O(1) removal
        self._index: dict[int, int] = {}  # chain hash -> block id
        self._seqs: dict[int, _Sequence] = {}

    # ---- properties and queries -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def enable_prefix_caching(self) -> bool:
        return self._caching

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def has(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def seq_ids(self) -> list[int]:
        return sorted(self._seqs)

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._get("block_table", seq_id).table)

    def num_tokens(self, seq_id: int) -> int:
        return self._get("num_tokens", seq_id).num_tokens

    def ref_count(self, block_id: int) -> int:
        if not 0 <= block_id < self._num_blocks:
            raise InvalidArgumentError(f"ref_count: block id {block_id} is outside [0, {self._num_blocks})")
        return self._blocks[block_id].ref_count

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether `num_tokens` fit without any prefix hit (a conservative answer)."""
        if num_tokens < 0:
            raise InvalidArgumentError(f"can_allocate: num_tokens={num_tokens} must be >= 0")
        return _cdiv(num_tokens, self._block_size) <= len(self._free)

    def can_append(self, seq_id: int, n: int = 1) -> bool:
        seq = self._get("can_append", seq_id)
        self._check_n("can_append", n)
        return self._append_cost(seq, n) <= len(self._free)

    def __repr__(self) -> str:
        return (f"BlockManager(num_blocks={self._num_blocks}, block_size={self._block_size}, "
                f"free={len(self._free)}, sequences={len(self._seqs)})")

    # ---- actions ----------------------------------------------------------------------------------------
    def allocate(self, seq_id: int, token_ids) -> int:
        """Create the block table for a prompt; returns how many leading tokens are already cached."""
        if seq_id in self._seqs:
            raise DuplicateSequenceError(f"allocate: sequence id {seq_id} already exists")
        tokens = [index(t) for t in token_ids]  # ints only, as the C++ twin accepts
        n, bs = len(tokens), self._block_size
        hashes = self._hash_blocks(ROOT_HASH, tokens, 0, n // bs) if self._caching else []
        hits = []
        for i in range((n - 1) // bs if self._caching and n else 0):  # never the block with the last token
            b = self._lookup(hashes[i], tokens[i * bs:(i + 1) * bs])
            if b is None:
                break
            hits.append(b)
        need = _cdiv(n, bs) - len(hits) + sum(1 for b in hits if self._blocks[b].ref_count == 0)
        self._check_free("allocate", seq_id, need)
        table = []
        for b in hits:
            if self._blocks[b].ref_count == 0:
                del self._free[b]
            self._blocks[b].ref_count += 1
            table.append(b)
        for i in range(len(hits), _cdiv(n, bs)):
            b = self._take_free()
            table.append(b)
            if i < len(hashes):
                self._register(b, hashes[i], tokens[i * bs:(i + 1) * bs])
        self._seqs[seq_id] = _Sequence(table, n, tokens if self._caching else [], hashes)
        return len(hits) * bs

    def append(self, seq_id: int, n: int = 1, token_ids=None):
        """Grow a sequence by n tokens; returns (slots to write, block copies to perform before writing)."""
        seq = self._get("append", seq_id)
        self._check_n("append", n)
        if token_ids is not None:
            token_ids = [index(t) for t in token_ids]
            if len(token_ids) != n:
                raise InvalidArgumentError(f"append: got {len(token_ids)} token ids for n={n}")
        if n == 0:
            return [], []
        self._check_free("append", seq_id, self._append_cost(seq, n))
        bs, start, table = self._block_size, seq.num_tokens, seq.table
        copies = []
        if start % bs:  # the write starts inside the last block
            last = table[-1]
            if self._blocks[last].ref_count > 1:
                fresh = self._take_free()
                self._blocks[last].ref_count -= 1
                table[-1] = fresh
                copies.append((last, fresh))
            else:
                self._unregister(last)
        for _ in range(_cdiv(start + n, bs) - len(table)):
            table.append(self._take_free())
        seq.num_tokens = start + n
        slots = [table[p // bs] * bs + p % bs for p in range(start, start + n)]
        if self._caching and token_ids is not None and len(seq.tokens) == start:
            seq.tokens.extend(token_ids)
            first = len(seq.hashes)
            prev = seq.hashes[-1] if seq.hashes else ROOT_HASH
            new_hashes = self._hash_blocks(prev, seq.tokens, first, seq.num_tokens // bs)
            seq.hashes.extend(new_hashes)
            for i, h in enumerate(new_hashes, start=first):
                self._register(table[i], h, seq.tokens[i * bs:(i + 1) * bs])
        return slots, copies

    def fork(self, parent_id: int, child_id: int, at=None):
        """Give `child_id` the parent's first `at` tokens (default all) by sharing blocks; copies nothing."""
        parent = self._get("fork", parent_id)
        if child_id in self._seqs:
            raise DuplicateSequenceError(f"fork: sequence id {child_id} already exists")
        if at is None:
            at = parent.num_tokens
        if not 0 <= at <= parent.num_tokens:
            raise InvalidArgumentError(
                f"fork: at={at} is outside [0, {parent.num_tokens}] for parent sequence {parent_id}")
        table = parent.table[:_cdiv(at, self._block_size)]
        for b in table:
            self._blocks[b].ref_count += 1
        tokens = parent.tokens[:at]
        hashes = parent.hashes[:len(tokens) // self._block_size]
        self._seqs[child_id] = _Sequence(table, at, tokens, hashes)
        return []

    def free(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise _unknown("free", seq_id)
        for b in reversed(seq.table):  # the tail joins the queue first, so it is evicted first
            block = self._blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[b] = None

    # ---- internals --------------------------------------------------------------------------------------
    def _get(self, op: str, seq_id: int) -> _Sequence:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise _unknown(op, seq_id)
        return seq

    @staticmethod
    def _check_n(op: str, n: int) -> None:
        if n < 0:
            raise InvalidArgumentError(f"{op}: n={n} must be >= 0")

    def _check_free(self, op: str, seq_id: int, need: int) -> None:
        if need > len(self._free):
            raise OutOfBlocksError(
                f"{op}: sequence {seq_id} needs {need} free blocks but only {len(self._free)} are free")

    def _append_cost(self, seq: _Sequence, n: int) -> int:
        """Free blocks an append of n tokens takes: new blocks, plus one if the shared last block is copied."""
        if n == 0:
            return 0
        bs = self._block_size
        cost = _cdiv(seq.num_tokens + n, bs) - len(seq.table)
        if seq.num_tokens % bs and self._blocks[seq.table[-1]].ref_count > 1:
            cost += 1
        return cost

    def _hash_blocks(self, prev: int, tokens: list, first: int, end: int) -> list[int]:
        bs, out = self._block_size, []
        for i in range(first, end):
            prev = chain_hash(prev, tokens[i * bs:(i + 1) * bs])
            out.append(prev)
        return out

    def _lookup(self, h: int, tokens: list):
        b = self._index.get(h)
        if b is not None and self._blocks[b].token_ids == tokens:
            return b
        return None

    def _take_free(self) -> int:
        b, _ = self._free.popitem(last=False)
        self._unregister(b)  # evict whatever prefix it cached
        self._blocks[b].ref_count = 1
        return b

    def _register(self, b: int, h: int, tokens: list) -> None:
        if not self._caching:
            return
        self._unregister(b)
        old = self._index.get(h)
        if old is not None and old != b:
            self._blocks[old].hash = None
            self._blocks[old].token_ids = None
        self._index[h] = b
        self._blocks[b].hash = h
        self._blocks[b].token_ids = list(tokens)

    def _unregister(self, b: int) -> None:
        block = self._blocks[b]
        if block.hash is not None:
            del self._index[block.hash]
            block.hash = None
            block.token_ids = None
