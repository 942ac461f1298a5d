"""Model-based test of prefix hits: a model that predicts exactly how many blocks each request
hits, run with the real hash and with degenerate ones (every block colliding; equal blocks after
different prefixes colliding), including requests that compute the same blocks in one call.

The model knows blocks, not pages or hash tables: the cache registers a block under its hash key
unless that key is taken; a block whose content (salt, whole prefix) and parent equal a
registered one's is a duplicate, and what follows it chains onto the registered copy; a block
whose key is taken by another block, and everything after it, is not registered. A request hits
the leading run of its blocks registered with exactly its content and parent whose K/V were all
written (never its last token). A registered block is dropped when the last sequence holding it
ends before its K/V were written. The pool is large enough that nothing is ever evicted (the
model checks that), and `reset_prefix_cache` starts over when it fills up.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import jaxpaged as jp
from tests.helpers import key_values

PS, LAYERS, WIDTH, ROWS = 4, 2, 24, 3
SPEC = dict(num_layers=LAYERS, num_kv_heads=1, head_dim=2, page_size=PS, num_pages=64,
            max_seqs=4, max_pages_per_seq=WIDTH // PS, prefix_caching=True, table_capacity=512)
SLOTS = ROWS * WIDTH
SALTS = [0, 0, 0, 1, 1 << 32]  # 1 << 32 would collide with 0 if salts were truncated to 32 bits
FAMILIES = [[7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3, 5, 3, 6],
            [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4],
            [7, 1, 8, 2, 6, 6, 6, 6, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3],
            [5] * 20,
            [6, 6, 6, 6, 5, 5, 5, 5, 1, 1, 1, 1, 5, 5, 5, 5, 6, 6, 6, 6]]
ROOT = "root"  # the parent of a first block


class Page:
  """A page as the model sees it: which tokens of each layer were written."""

  def __init__(self):
    self.written = [0] * LAYERS

  @property
  def full(self):
    return all(w == PS for w in self.written)


class Entry:
  """A registered block: its content (salt, whole prefix), parent entry and page."""

  def __init__(self, content, parent, page):
    self.content, self.parent, self.page = content, parent, page


class Unregistered:
  """A full block that is not registered itself (a duplicate, or its key was taken)."""

  def __init__(self, content, parent):
    self.content, self.parent = content, parent


class Seq:

  def __init__(self, salt):
    self.salt, self.tokens, self.pages, self.blocks = salt, [], [], []
    self.written = [0] * LAYERS  # tokens written, per layer, from the start


class PrefixHitMachine(RuleBasedStateMachine):
  block_hash = "mix64"

  def __init__(self):
    super().__init__()
    self.spec = jp.CacheSpec(**SPEC, block_hash=self.block_hash)
    self.cache = jp.init_cache(self.spec)
    self.seqs = {}  # seq id -> Seq
    self.table = {}  # hash key -> Entry

  # --------------------------------------------------------------------------- the model

  def _key(self, seq, j):
    return tuple(jp.block_hashes(seq.tokens[:(j + 1) * PS], PS, seq.salt, self.block_hash)[j])

  def _content(self, seq, j):
    return (seq.salt, tuple(seq.tokens[:(j + 1) * PS]))

  def _resolve(self, seq, j):
    """The registered entry holding block j of ``seq`` (ROOT before block 0), or None."""
    if j < 0:
      return ROOT
    block = seq.blocks[j]
    if isinstance(block, Entry):
      return block
    if block.parent is None:
      return None
    entry = self.table.get(self._key(seq, j))
    if entry is not None and entry.content == block.content and entry.parent is block.parent:
      return entry
    return None

  def _hits(self, seq, length):
    """Blocks a new request for ``seq.tokens[:length]`` hits."""
    parent = ROOT
    for j in range((length - 1) // PS):
      entry = self.table.get(self._key(seq, j))
      if (entry is None or entry.content != self._content(seq, j) or entry.parent is not parent
          or not entry.page.full):
        return j
      parent = entry
    return (length - 1) // PS

  def _register(self, seq, j, page):
    """Block j of ``seq`` just filled (its tokens are known) on ``page``."""
    parent = self._resolve(seq, j - 1)
    content = self._content(seq, j)
    if parent is None:
      seq.blocks.append(Unregistered(content, None))
      event("not registered: prefix unregistered")
      return
    key = self._key(seq, j)
    entry = self.table.get(key)
    if entry is None:
      self.table[key] = Entry(content, parent, page)
      seq.blocks.append(self.table[key])
      return
    if entry.content == content and entry.parent is parent:
      event("duplicate block")
    else:
      event("key taken by another block")
    seq.blocks.append(Unregistered(content, parent))

  def _used_pages(self):
    return {id(p) for s in self.seqs.values() for p in s.pages}

  def _drop_unwritten(self, pages):
    """Entries whose page nobody holds any more and that were never fully written go."""
    held = self._used_pages()
    for key, entry in list(self.table.items()):
      if id(entry.page) not in held and not entry.page.full and any(entry.page is p for p in pages):
        del self.table[key]
        event("unwritten block dropped")

  def _pages_in_use(self):
    idle = {id(e.page) for e in self.table.values()} - self._used_pages()
    return len(self._used_pages()) + len(idle)

  # --------------------------------------------------------------------------- device helpers

  def _write(self, seq_id, upto):
    """Writes the K/V of ``seq``'s tokens up to ``upto[layer]`` (each layer)."""
    seq = self.seqs[seq_id]
    table = np.asarray(self.cache.page_table)[seq_id]
    values = key_values(seq.tokens)
    for layer in range(LAYERS):
      start, end = seq.written[layer], upto[layer]
      slots = np.full(WIDTH, -1, np.int32)
      kv = np.zeros(WIDTH, np.float32)
      for i, pos in enumerate(range(start, end)):
        slots[i] = table[pos // PS] * PS + pos % PS
        kv[i] = values[pos] + 1000 * layer
        seq.pages[pos // PS].written[layer] += 1
      if end > start:
        kv = jnp.broadcast_to(jnp.asarray(kv)[:, None, None], (WIDTH, 1, 2))
        self.cache = jp.write_kv(self.cache, layer, kv, -kv, jnp.asarray(slots))
      seq.written[layer] = max(start, end)

  def _reset_if_full(self, pages):
    """Starts over (everything released, cache reset) if ``pages`` more might evict."""
    if self._pages_in_use() + pages <= SPEC["num_pages"]:
      return
    self.cache = jp.release(self.cache, jnp.arange(SPEC["max_seqs"], dtype=jnp.int32))
    self.cache, ok = jp.reset_prefix_cache(self.cache)
    assert bool(ok)
    self.seqs, self.table = {}, {}
    event("reset")

  # --------------------------------------------------------------------------- rules

  @rule(data=st.data())
  def admit(self, data):
    """Up to three new requests in one call (same-step duplicates included)."""
    self._reset_if_full(ROWS * WIDTH // PS)
    empty = [s for s in range(SPEC["max_seqs"]) if s not in self.seqs]
    if not empty:
      return
    ids = data.draw(st.lists(st.sampled_from(empty), min_size=1, max_size=min(ROWS, len(empty)),
                             unique=True))
    family = data.draw(st.sampled_from(FAMILIES))
    prompts, salts, chunks = [], [], []
    for _ in ids:
      if not data.draw(st.integers(0, 3)):  # mostly the same family: shared, duplicated blocks
        family = data.draw(st.sampled_from(FAMILIES))
      prompts.append(family[:data.draw(st.sampled_from([1, 5, 9, 13, 17, 20]))]
                     + data.draw(st.lists(st.integers(0, 9), max_size=4)))
      salts.append(data.draw(st.sampled_from(SALTS)))
      chunks.append(data.draw(st.sampled_from([WIDTH, 3, 9])))
    tokens = np.zeros((ROWS, WIDTH), np.int32)
    for row, prompt in enumerate(prompts):
      tokens[row, :len(prompt)] = prompt
    pad = ROWS - len(ids)
    self.cache, match = jp.match_prefix(
        self.cache, jnp.array(ids + [-1] * pad, jnp.int32), jnp.asarray(tokens),
        jnp.array([len(p) for p in prompts] + [1] * pad), salts=salts + [0] * pad,
        max_prompt_tokens=jnp.array(chunks + [0] * pad), num_slots=SLOTS)
    assert bool(match.ok)
    # Every row's hits are decided before any row registers.
    seqs = [Seq(salt) for salt in salts]
    hits = []
    for seq, prompt in zip(seqs, prompts):
      seq.tokens = list(prompt)
      hits.append(self._hits(seq, len(prompt)))
    np.testing.assert_array_equal(np.asarray(match.num_cached)[:len(ids)],
                                  [h * PS for h in hits])
    for seq_id, seq, prompt, hit, chunk in zip(ids, seqs, prompts, hits, chunks):
      event(f"hit {hit} blocks" if hit < 3 else "hit 3+ blocks")
      self.seqs[seq_id] = seq
      entries = [self.table[self._key(seq, j)] for j in range(hit)]
      seq.blocks, seq.pages = list(entries), [e.page for e in entries]
      seq.written = [hit * PS] * LAYERS
      length = hit * PS + min(len(prompt) - hit * PS, chunk)
      seq.tokens = list(prompt[:length])
    for seq_id, seq in zip(ids, seqs):
      self._grow(seq, len(seq.tokens))
    self._check_cached_blocks()
    if data.draw(st.booleans()):  # often the model computes the prompt at once
      for seq_id in ids:
        self._write(seq_id, [len(self.seqs[seq_id].tokens)] * LAYERS)

  def _grow(self, seq, length):
    """``seq`` now holds ``length`` tokens: new pages, and registrations of full blocks."""
    while len(seq.pages) * PS < length:
      seq.pages.append(Page())
    for j in range(len(seq.blocks), length // PS):
      self._register(seq, j, seq.pages[j])

  @rule(data=st.data())
  def append(self, data):
    """Up to two sequences append tokens in one call: twins append the same ones."""
    self._reset_if_full(4)
    if not self.seqs:
      return
    ids = data.draw(st.lists(st.sampled_from(sorted(self.seqs)), min_size=1, max_size=2,
                             unique=True))
    new = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=4))
    rows = [(s, new if data.draw(st.booleans()) else data.draw(
        st.lists(st.integers(0, 9), min_size=1, max_size=4))) for s in ids]
    rows = [(s, t[:max(0, WIDTH - len(self.seqs[s].tokens))]) for s, t in rows]
    rows = [(s, t) for s, t in rows if t]
    if not rows:
      return
    flat = np.zeros(8, np.int32)
    flat[:sum(len(t) for _, t in rows)] = sum((t for _, t in rows), [])
    counts = [len(t) for _, t in rows] + [0] * (2 - len(rows))
    self.cache, _, ok = jp.extend(self.cache, jnp.array([s for s, _ in rows] + [-1] * (2 - len(rows))),
                                  jnp.array(counts), num_slots=8, tokens=jnp.asarray(flat))
    assert bool(ok)
    for s, tokens in rows:
      self.seqs[s].tokens += tokens
    for s, _ in rows:
      self._grow(self.seqs[s], len(self.seqs[s].tokens))
    self._check_cached_blocks()

  @rule(data=st.data())
  def write(self, data):
    """A sequence's K/V are written: all of them, or only some layers / tokens."""
    if not self.seqs:
      return
    seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
    seq = self.seqs[seq_id]
    n = len(seq.tokens)
    partial = data.draw(st.sampled_from([None, None, "layer", "tokens"]))
    upto = [n] * LAYERS
    if partial == "layer":
      upto[1] = seq.written[1]
    elif partial == "tokens":
      upto = [max(w, n - 1) for w in seq.written]
    self._write(seq_id, upto)

  @rule(data=st.data())
  def release(self, data):
    if not self.seqs:
      return
    seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
    self.cache = jp.release(self.cache, jnp.array([seq_id]))
    pages = self.seqs.pop(seq_id).pages
    self._drop_unwritten(pages)
    self._check_cached_blocks()

  # --------------------------------------------------------------------------- invariants

  def _check_cached_blocks(self):
    assert int(jp.prefix_stats(self.cache)["cached_blocks"]) == len(self.table)
    assert int(jp.prefix_stats(self.cache)["evictions"]) == 0  # the model has no evictions

  @invariant()
  def written_key_values_are_the_sequences_own(self):
    for seq_id, seq in self.seqs.items():
      for layer in range(LAYERS):
        k, _ = jp.gather_kv(self.cache, layer, seq_id)
        n = seq.written[layer]
        np.testing.assert_array_equal(np.asarray(k)[:n, 0, 0],
                                      key_values(seq.tokens)[:n] + 1000 * layer)


class CollidingPrefixHitMachine(PrefixHitMachine):
  block_hash = "constant"


class UnchainedPrefixHitMachine(PrefixHitMachine):
  block_hash = "unchained"


TestPrefixHits = PrefixHitMachine.TestCase
TestCollidingPrefixHits = CollidingPrefixHitMachine.TestCase
TestUnchainedPrefixHits = UnchainedPrefixHitMachine.TestCase
