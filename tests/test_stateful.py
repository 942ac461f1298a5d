"""Model-based test: long random runs of extend/write/fork/release against a pure-Python model.

The model knows nothing of page tables or free stacks: a sequence is a list of page objects and a
list of written token values; pages are shared only by forking, copied on write when a shared,
partly filled page is appended to (rows in call order, the last sharer keeping the page), and
counted as free when no sequence holds them. After every step the cache must agree with it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import jaxpaged as jp
from tests.helpers import check_defragmented, key_values

SPEC = jp.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=2, page_size=3, num_pages=9,
                    max_seqs=5, max_pages_per_seq=4)
ROWS, NUM_SLOTS, FORK_ROWS, RELEASE_ROWS = 3, 8, 2, 2  # fixed call shapes: nothing recompiles
# Head/dim offsets and a per-layer offset make a token written to the wrong head, element or layer
# show up as a wrong value.
OFFSETS = np.array([[0.25, 0.5], [0.75, 0.875]], np.float32)
LAYER_STEP = 1000.0

# Most calls are valid (distinct ids, small counts) so runs go deep: they grow sequences to
# capacity, exhaust the pool and share pages. One call in four carries one kind of bad input.
CORRUPTIONS = [None, None, None, "bad_id", "padding", "duplicate", "negative", "huge"]


def _corrupt(data, ids, counts):
  kind = data.draw(st.sampled_from(CORRUPTIONS))
  row = data.draw(st.integers(0, len(ids) - 1))
  if kind == "bad_id":
    ids[row] = data.draw(st.sampled_from([-2, SPEC.max_seqs]))
  elif kind == "padding":
    ids[row] = -1
  elif kind == "duplicate":
    ids[row] = ids[(row + 1) % len(ids)]
  elif kind == "negative" and counts is not None:
    counts[row] = -1
  elif kind == "huge" and counts is not None:
    counts[row] = data.draw(st.sampled_from([NUM_SLOTS, SPEC.max_seq_len + 1]))
  return ids, counts


def _distinct_ids(data, n, pool=range(SPEC.max_seqs)):
  return list(data.draw(st.permutations(list(pool)))[:n])


def _defragmented(cache):
  """`jaxpaged.defragment` of ``cache``, which it must leave as it was (`check_defragmented`)."""
  before = jax.tree.map(np.asarray, cache)
  new = jp.defragment(cache)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, cache), before)
  check_defragmented(cache, new)
  return new


class Page:
  """A physical page as the model sees it: identity only."""


class PagedCacheMachine(RuleBasedStateMachine):

  def __init__(self):
    super().__init__()
    self.cache = jp.init_cache(SPEC)
    self.pages = {s: [] for s in range(SPEC.max_seqs)}  # seq -> [Page] by logical index
    self.tokens = {s: [] for s in range(SPEC.max_seqs)}  # seq -> [value] by position
    self.next_value = 1.0
    self.host = []  # (SwappedSequence, its token values), as swap_out returned them

  # --------------------------------------------------------------------------- model

  def _used_pages(self, pages=None):
    pages = self.pages if pages is None else pages
    return {id(p) for held in pages.values() for p in held}

  def _plan_extend(self, ids, counts):
    """The model's answer: new page lists, or None if the call must be refused."""
    live = [(s, n) for s, n in zip(ids, counts) if s != -1]
    if any(not 0 <= s < SPEC.max_seqs for s, _ in live):
      return None
    if len({s for s, _ in live}) != len(live) or any(n < 0 for _, n in live):
      return None
    if any(len(self.tokens[s]) + n > SPEC.max_seq_len for s, n in live):
      return None
    if sum(max(n, 0) for n in counts) > NUM_SLOTS:  # padding rows keep their entries too
      return None
    pages = {s: list(held) for s, held in self.pages.items()}
    ps = SPEC.page_size
    for s, n in live:
      length = len(self.tokens[s])
      if n and length % ps:
        last = pages[s][-1]
        if sum(p is last for held in pages.values() for p in held) > 1:
          pages[s][-1] = Page()  # copy-on-write
          event("copy-on-write")
      pages[s] += [Page() for _ in range(-(-(length + n) // ps) - -(-length // ps))]
    if len(self._used_pages(pages)) > SPEC.num_pages:
      return None
    return pages

  def _snapshot(self):
    return jax.tree.map(np.asarray, self.cache)

  def _assert_unchanged(self, before):
    jax.tree.map(np.testing.assert_array_equal, self._snapshot(), before)

  # --------------------------------------------------------------------------- rules

  @rule(data=st.data(), impl=st.sampled_from(["xla", "xla", "pallas"]))
  def extend_and_write(self, data, impl):
    ids = _distinct_ids(data, ROWS)
    counts = data.draw(st.lists(st.integers(0, 4), min_size=ROWS, max_size=ROWS))
    self._extend_and_write(*_corrupt(data, ids, counts), impl)

  def _extend_and_write(self, ids, counts, impl):
    planned = self._plan_extend(ids, counts)
    before = self._snapshot()
    self.cache, slots, ok = jp.extend(self.cache, jnp.array(ids, jnp.int32),
                                      jnp.array(counts, jnp.int32), num_slots=NUM_SLOTS)
    assert bool(ok) == (planned is not None), (ids, counts)
    event(f"extend {'ok' if ok else 'refused'}")
    if planned is None:
      self._assert_unchanged(before)
      assert (np.asarray(slots) == -1).all()
      return
    self.pages = planned
    values = np.zeros(NUM_SLOTS, np.float32)
    t = 0
    for s, n in zip(ids, counts):
      for _ in range(n):  # a padding row's entries are skipped (slot -1), not removed
        if s != -1:
          values[t] = self.next_value
          self.tokens[s].append(self.next_value)
          self.next_value += 1
        t += 1
    for layer in range(SPEC.num_layers):
      k = values[:, None, None] + OFFSETS + layer * LAYER_STEP
      self.cache = jp.write_kv(self.cache, layer, jnp.asarray(k), jnp.asarray(-k), slots,
                               impl=impl, interpret=True)

  @rule(data=st.data())
  def fork(self, data):
    # Usually live sources into distinct empty destinations.
    busy = [s for s in range(SPEC.max_seqs) if self.tokens[s]] or [0]
    empty = [s for s in range(SPEC.max_seqs) if not self.tokens[s]]
    dst = (_distinct_ids(data, FORK_ROWS, empty) if len(empty) >= FORK_ROWS
           else _distinct_ids(data, FORK_ROWS))
    src = [data.draw(st.sampled_from(busy)) for _ in range(FORK_ROWS)]
    if data.draw(st.booleans()):
      dst, _ = _corrupt(data, dst, None)
    if data.draw(st.integers(0, 7)) == 0:
      src[0] = data.draw(st.sampled_from([-2, -1, SPEC.max_seqs]))
    pairs = list(zip(src, dst))
    live = [(src, dst) for src, dst in pairs if dst != -1]
    valid = (all(0 <= src < SPEC.max_seqs and 0 <= dst < SPEC.max_seqs for src, dst in live)
             and len({dst for _, dst in live}) == len(live)
             and all(not self.tokens[dst] for _, dst in live))
    before = self._snapshot()
    self.cache, ok = jp.fork(self.cache, jnp.array([p[0] for p in pairs], jnp.int32),
                             jnp.array([p[1] for p in pairs], jnp.int32))
    assert bool(ok) == valid, pairs
    event(f"fork {'ok' if ok else 'refused'}")
    if not valid:
      self._assert_unchanged(before)
      return
    # Every source is read before any destination is written (a row may fork from another
    # row's destination and gets its state from before the call).
    copies = [(dst, list(self.pages[src]), list(self.tokens[src])) for src, dst in live]
    for dst, pages, tokens in copies:
      self.pages[dst], self.tokens[dst] = pages, tokens

  def _sharers_of_partial_pages(self):
    """Groups of sequences whose last, partly filled page is one shared page."""
    groups = {}
    for s, held in self.pages.items():
      if held and len(self.tokens[s]) % SPEC.page_size:
        groups.setdefault(id(held[-1]), []).append(s)
    return [g for g in groups.values() if len(g) > 1]

  @precondition(lambda self: self._sharers_of_partial_pages())
  @rule(data=st.data())
  def sharers_append_together(self, data):
    """All sequences sharing one partly filled page append in one call (copy-on-write race)."""
    group = data.draw(st.sampled_from(self._sharers_of_partial_pages()))[:ROWS]
    rows = [(s, data.draw(st.integers(1, 2))) for s in group]
    rows += [(-1, 0)] * (ROWS - len(rows))
    self._extend_and_write([r[0] for r in rows], [r[1] for r in rows], "xla")

  @rule(ids=st.lists(st.integers(-2, SPEC.max_seqs), min_size=RELEASE_ROWS,
                     max_size=RELEASE_ROWS))
  def release(self, ids):
    if any(len(self.pages[s]) and any(p in held for t, held in self.pages.items() if t != s
                                      for p in self.pages[s]) for s in ids if 0 <= s < SPEC.max_seqs):
      event("release of a sequence with shared pages")
    self.cache = jp.release(self.cache, jnp.array(ids, jnp.int32))
    for s in ids:
      if 0 <= s < SPEC.max_seqs:
        self.pages[s], self.tokens[s] = [], []

  @rule(data=st.data())
  def swap_out(self, data):
    live = [s for s in range(SPEC.max_seqs) if self.tokens[s]]
    if not live or len(self.host) >= 4:
      return
    ids = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=2, unique=True))
    self.cache, swapped = jp.swap_out(self.cache, ids)
    for s, out in zip(ids, swapped):
      assert (out.seq_id, out.length) == (s, len(self.tokens[s]))
      self.host.append((out, self.tokens[s]))
      self.pages[s], self.tokens[s] = [], []
    event("swap out")

  @precondition(lambda self: self.host)
  @rule(data=st.data())
  def swap_in(self, data):
    index = data.draw(st.integers(0, len(self.host) - 1))
    swapped, tokens = self.host[index]
    target = swapped.seq_id
    if self.tokens[target]:  # the slot was reused meanwhile: another empty one, if any
      with pytest.raises(jp.JaxPagedError, match="holds tokens; swap in into an empty slot"):
        jp.swap_in(self.cache, swapped)
      empty = [s for s in range(SPEC.max_seqs) if not self.tokens[s]]
      if not empty:
        return
      target = data.draw(st.sampled_from(empty))
    pages = -(-len(tokens) // SPEC.page_size)
    fits = len(self._used_pages()) + pages <= SPEC.num_pages
    before = self._snapshot()
    self.cache, ok = jp.swap_in(self.cache, swapped, seq_id=target)
    assert bool(ok) == fits
    event(f"swap in {'ok' if ok else 'refused'}")
    if not fits:
      self._assert_unchanged(before)
      return
    self.host.pop(index)
    self.pages[target], self.tokens[target] = [Page() for _ in range(pages)], list(tokens)

  @precondition(lambda self: len(self._used_pages()) >= SPEC.num_pages - 1)
  @rule()
  def defragment(self):
    self.cache = _defragmented(self.cache)

  @rule()
  def release_everything_leaks_nothing(self):
    self.cache = jp.release(self.cache, jnp.arange(SPEC.max_seqs, dtype=jnp.int32))
    self.pages = {s: [] for s in self.pages}
    self.tokens = {s: [] for s in self.tokens}
    assert int(jp.num_free_pages(self.cache)) == SPEC.num_pages
    assert (np.asarray(self.cache.ref_counts) == 0).all()

  # --------------------------------------------------------------------------- invariants

  @invariant()
  def pages_match_the_model(self):
    table = np.asarray(self.cache.page_table)
    ref_counts = np.asarray(self.cache.ref_counts)
    lens = np.asarray(self.cache.seq_lens)
    physical_of, model_of = {}, {}
    for s in range(SPEC.max_seqs):
      assert lens[s] == len(self.tokens[s])
      held = self.pages[s]
      assert (table[s, :len(held)] >= 0).all() and (table[s, len(held):] == -1).all()
      for page, physical in zip(held, table[s]):
        # One model page is one physical page and vice versa: no page is owned twice.
        assert physical_of.setdefault(id(page), physical) == physical
        assert model_of.setdefault(int(physical), id(page)) == id(page)
    referring = np.bincount(table[table >= 0], minlength=SPEC.num_pages)
    np.testing.assert_array_equal(ref_counts, referring)
    num_free = int(self.cache.num_free)
    free = np.asarray(self.cache.free_pages)[:num_free]
    assert len(set(free.tolist())) == num_free  # no page on the free stack twice
    assert set(free.tolist()) == set(np.flatnonzero(ref_counts == 0).tolist())
    assert num_free + len(self._used_pages()) == SPEC.num_pages
    assert int(jp.num_used_pages(self.cache)) == len(self._used_pages())

  @invariant()
  def gathered_kv_is_what_was_written(self):
    for s in range(SPEC.max_seqs):
      n = len(self.tokens[s])
      for layer in range(SPEC.num_layers):
        k, v = jp.gather_kv(self.cache, layer, s)
        expected = (np.array(self.tokens[s], np.float32)[:, None, None] + OFFSETS
                    + layer * LAYER_STEP)
        np.testing.assert_array_equal(np.asarray(k)[:n], expected)
        np.testing.assert_array_equal(np.asarray(v)[:n], -expected)



TestPagedCache = PagedCacheMachine.TestCase


# ----------------------------------------------------------------------------- prefix caching

PREFIX_SPEC = dict(num_layers=2, num_kv_heads=1, head_dim=2, page_size=4, num_pages=14,
                   max_seqs=4, max_pages_per_seq=7, prefix_caching=True)
PROMPT_WIDTH, EXTEND_ROWS, EXTEND_SLOTS = 24, 2, 6
RESIZE_BY = 6  # the resize rule moves between num_pages and num_pages + this
HOST_BLOCKS = 6  # the host tier of demoted blocks holds this many
SALTS = [0, 0, 1, 1 << 32]  # 1 << 32 would share pages with 0 if salts were truncated
# Shared prefixes, and blocks that repeat within and across prompts after different prefixes.
FAMILIES = [[7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3, 5, 3, 6],
            [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4],
            [7, 1, 8, 2, 6, 6, 6, 6, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3],
            [5] * 20,
            [6, 6, 6, 6, 5, 5, 5, 5, 1, 1, 1, 1, 5, 5, 5, 5, 6, 6, 6, 6]]


class PrefixCacheMachine(RuleBasedStateMachine):
  """Admission with prefix matching, chunked appends with token ids, forks, releases and
  resets, against a content oracle and the prefix cache's structural invariants."""

  block_hash = "mix64"

  def __init__(self):
    super().__init__()
    self.spec = jp.CacheSpec(**PREFIX_SPEC, block_hash=self.block_hash)
    self.cache = jp.init_cache(self.spec)
    self.tokens = {s: [] for s in range(self.spec.max_seqs)}
    self.salts = {s: 0 for s in range(self.spec.max_seqs)}
    self.swapped = []  # (SwappedSequence, tokens, salt)
    # Demoted blocks live in a small host tier: it must stay within its capacity.
    self.host = jp.TieredStore([jp.Tier("host", HOST_BLOCKS * self._block_bytes())])

  def _block_bytes(self):
    spec = self.spec
    return spec.page_bytes + 4 * spec.page_size * spec.max_pages_per_seq

  def _snapshot(self):
    return jax.tree.map(np.asarray, self.cache)

  def _reclaimable(self):
    return int(jp.num_free_pages(self.cache)) + int(jp.num_cached_free_pages(self.cache))

  def _write(self, seq, start, slots, count):
    """Writes the K/V of tokens[start:start+count] of `seq` at `slots` (all layers)."""
    values = key_values(self.tokens[seq])[start:start + count]
    padded = np.zeros(slots.shape[0], np.float32)
    padded[:count] = values
    valid = np.where(np.arange(slots.shape[0]) < count, np.asarray(slots), -1)
    for layer in range(self.spec.num_layers):
      kv = jnp.broadcast_to(jnp.asarray(padded)[:, None, None] + 1000 * layer,
                            (slots.shape[0], 1, 2))
      self.cache = jp.write_kv(self.cache, layer, kv, -kv, jnp.asarray(valid, jnp.int32))

  @rule(data=st.data())
  def admit(self, data):
    empty = [s for s in range(self.spec.max_seqs) if not self.tokens[s]]
    seq = data.draw(st.sampled_from(empty or [0]))
    family = data.draw(st.sampled_from(FAMILIES))
    prompt = family[:data.draw(st.integers(1, 20))] + data.draw(
        st.lists(st.integers(0, 9), max_size=4))
    salt = data.draw(st.sampled_from(SALTS))
    chunk = data.draw(st.sampled_from([None, 3, 9]))
    tokens = np.zeros((1, PROMPT_WIDTH), np.int32)
    tokens[0, :len(prompt)] = prompt
    args = (jnp.array([seq], jnp.int32), jnp.asarray(tokens), jnp.array([len(prompt)]))
    kwargs = dict(salts=[salt], num_slots=PROMPT_WIDTH,
                  max_prompt_tokens=None if chunk is None else jnp.array([chunk]))
    before = self._snapshot()
    self.cache, match = jp.match_prefix(self.cache, *args, **kwargs)
    event(f"admit {'ok' if match.ok else 'refused'}")
    if not bool(match.ok):
      jax.tree.map(np.testing.assert_array_equal, self._snapshot(), before)
      if not self.tokens[seq]:  # a request for an empty slot is refused only for lack of pages
        with pytest.raises(jp.JaxPagedError, match="^cache: has too few free pages"):
          jp.check_match_prefix(jax.tree.map(jnp.asarray, before), *args, **kwargs)
      return
    cached, new = int(match.num_cached[0]), int(match.num_new[0])
    assert not self.tokens[seq] and cached % self.spec.page_size == 0
    assert cached <= len(prompt) - 1 and new == min(len(prompt) - cached, chunk or 99)
    if cached:
      event("prefix hit")
    self.tokens[seq] = prompt[:cached + new]
    self.salts[seq] = salt
    self._write(seq, cached, match.slots, new)

  @rule(data=st.data())
  def admit_twins(self, data):
    """Two requests of one family in one call: they compute their common blocks at once."""
    empty = [s for s in range(self.spec.max_seqs) if not self.tokens[s]]
    if len(empty) < 2:
      return
    seqs = data.draw(st.permutations(empty))[:2]
    family = data.draw(st.sampled_from(FAMILIES))
    prompts = [family[:data.draw(st.integers(1, 20))]
               + data.draw(st.lists(st.integers(0, 9), max_size=4)) for _ in seqs]
    salt = data.draw(st.sampled_from(SALTS))
    tokens = np.zeros((2, PROMPT_WIDTH), np.int32)
    for row, prompt in enumerate(prompts):
      tokens[row, :len(prompt)] = prompt
    self.cache, match = jp.match_prefix(self.cache, jnp.array(seqs, jnp.int32),
                                        jnp.asarray(tokens), jnp.array([len(p) for p in prompts]),
                                        salts=[salt, salt], num_slots=2 * PROMPT_WIDTH)
    event(f"admit twins {'ok' if match.ok else 'refused'}")
    if not bool(match.ok):
      return
    start = 0
    for row, (seq, prompt) in enumerate(zip(seqs, prompts)):
      cached, new = int(match.num_cached[row]), int(match.num_new[row])
      self.tokens[seq], self.salts[seq] = list(prompt), salt
      slots = np.full(PROMPT_WIDTH, -1, np.int32)  # one shape: write_kv compiles once
      slots[:new] = np.asarray(match.slots)[start:start + new]
      self._write(seq, cached, jnp.asarray(slots), new)
      start += new

  @rule(data=st.data())
  def append(self, data):
    live = [s for s in range(self.spec.max_seqs) if self.tokens[s]]
    if not live:
      return
    rows = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=EXTEND_ROWS,
                              unique=True))
    counts = [data.draw(st.integers(1, EXTEND_SLOTS // len(rows))) for _ in rows]
    new = [data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)) for n in counts]
    ids = rows + [-1] * (EXTEND_ROWS - len(rows))
    flat = sum(new, []) + [0] * (EXTEND_SLOTS - sum(counts))
    need = self._pages_needed(rows, counts)
    fits = need <= int(jp.num_free_pages(self.cache)) + int(jp.num_cached_free_pages(self.cache))
    too_long = any(len(self.tokens[s]) + n > self.spec.max_seq_len for s, n in zip(rows, counts))
    before = self._snapshot()
    self.cache, slots, ok = jp.extend(
        self.cache, jnp.array(ids, jnp.int32), jnp.array(counts + [0] * (EXTEND_ROWS - len(rows))),
        num_slots=EXTEND_SLOTS, tokens=jnp.array(flat, jnp.int32))
    assert bool(ok) == (fits and not too_long)
    if not bool(ok):
      jax.tree.map(np.testing.assert_array_equal, self._snapshot(), before)
      return
    start = 0
    for seq, count, toks in zip(rows, counts, new):
      old = len(self.tokens[seq])
      self.tokens[seq] = self.tokens[seq] + toks
      self._write(seq, old, slots[start:start + count], count)
      start += count

  def _pages_needed(self, rows, counts):
    """New pages an append takes: page-boundary crossings plus copy-on-write copies."""
    ps, table = self.spec.page_size, np.asarray(self.cache.page_table)
    refs = np.asarray(self.cache.ref_counts).copy()
    need = 0
    for seq, n in zip(rows, counts):
      length = len(self.tokens[seq])
      if length % ps:
        last = table[seq, length // ps]
        if refs[last] > 1:
          need += 1
          refs[last] -= 1
      need += -(-(length + n) // ps) - -(-length // ps)
    return need

  @rule(data=st.data())
  def fork(self, data):
    live = [s for s in range(self.spec.max_seqs) if self.tokens[s]]
    empty = [s for s in range(self.spec.max_seqs) if not self.tokens[s]]
    if not live or not empty:
      return
    src, dst = data.draw(st.sampled_from(live)), data.draw(st.sampled_from(empty))
    self.cache, ok = jp.fork(self.cache, jnp.array([src]), jnp.array([dst]))
    assert bool(ok)
    self.tokens[dst], self.salts[dst] = list(self.tokens[src]), self.salts[src]

  @rule(seq=st.integers(0, PREFIX_SPEC["max_seqs"] - 1))
  def release(self, seq):
    self.cache = jp.release(self.cache, jnp.array([seq]))
    self.tokens[seq], self.salts[seq] = [], 0

  @rule()
  def defragment(self):
    self.cache = _defragmented(self.cache)

  @rule(bigger=st.booleans())
  def resize(self, bigger):
    """Between two sizes (two compiled specs): growing always fits; shrinking fits only when
    the live pages do, else it is refused and changes nothing."""
    size = PREFIX_SPEC["num_pages"] + (RESIZE_BY if bigger else 0)
    old, before = self.cache, self._snapshot()
    live = self.spec.num_pages - int(old.num_free)
    if live > size:
      with pytest.raises(jp.JaxPagedError, match="cannot hold the"):
        jp.resize(old, size)
      jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, old), before)
      return
    self.cache = jp.resize(old, size)
    event(f"resize to {size}")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, old), before)
    self.spec = self.cache.spec
    assert self.spec.num_pages == size and self.spec.max_cached_blocks == size
    check_defragmented(old, self.cache, packed=size < old.spec.num_pages)

  @rule()
  def reset(self):
    before = self._snapshot()
    self.cache, ok = jp.reset_prefix_cache(self.cache)
    in_use = any(self.tokens.values())
    assert bool(ok) == (not in_use)
    if in_use:
      jax.tree.map(np.testing.assert_array_equal, self._snapshot(), before)
    else:
      assert int(jp.num_free_pages(self.cache)) == self.spec.num_pages

  @rule(data=st.data())
  def swap_out(self, data):
    live = [s for s in range(self.spec.max_seqs) if self.tokens[s]]
    if not live or len(self.swapped) >= 3:
      return
    seq = data.draw(st.sampled_from(live))
    self.cache, (swapped,) = jp.swap_out(self.cache, [seq])
    np.testing.assert_array_equal(np.asarray(swapped.tokens)[:swapped.length], self.tokens[seq])
    self.swapped.append((swapped, self.tokens[seq], self.salts[seq]))
    self.tokens[seq], self.salts[seq] = [], 0

  @precondition(lambda self: self.swapped)
  @rule(data=st.data())
  def swap_in(self, data):
    index = data.draw(st.integers(0, len(self.swapped) - 1))
    swapped, tokens, salt = self.swapped[index]
    empty = [s for s in range(self.spec.max_seqs) if not self.tokens[s]]
    if not empty:
      return
    target = swapped.seq_id if not self.tokens[swapped.seq_id] else empty[0]
    before = self._snapshot()
    fits = -(-len(tokens) // self.spec.page_size) <= self._reclaimable()
    self.cache, ok = jp.swap_in(self.cache, swapped, seq_id=target)
    event(f"swap in {'ok' if ok else 'refused'}")
    if not bool(ok):
      assert not fits  # a hit only lowers the need
      jax.tree.map(np.testing.assert_array_equal, self._snapshot(), before)
      return
    self.swapped.pop(index)
    self.tokens[target], self.salts[target] = tokens, salt

  @rule(count=st.integers(1, 4))
  def demote(self, count):
    evictable = int(jp.num_cached_free_pages(self.cache))
    free = int(jp.num_free_pages(self.cache))
    self.cache, blocks = jp.demote_blocks(self.cache, count)
    assert int(jp.num_free_pages(self.cache)) == free + min(count, evictable)
    ps = self.spec.page_size
    for block in blocks:
      hashes = jp.block_hashes(block.tokens, ps, block.salt, self.block_hash)
      assert block.key == jp.block_key(hashes[-1])
      for layer in range(self.spec.num_layers):
        np.testing.assert_array_equal(block.k[layer, 0, :, 0],
                                      key_values(block.tokens)[-ps:] + 1000 * layer)
      self.host.put((block.key, tuple(block.tokens)), block, self._block_bytes())
    event(f"demoted {len(blocks)}")

  @precondition(lambda self: len(self.host))
  @rule(data=st.data())
  def promote(self, data):
    """A new request for a demoted block's prompt: its device hits, then the block from host."""
    ps = self.spec.page_size
    empty = [s for s in range(self.spec.max_seqs) if not self.tokens[s]]
    if not empty:
      return
    seq, key = data.draw(st.sampled_from(empty)), data.draw(st.sampled_from(self.host.keys()))
    block = self.host.peek(key)
    tokens = np.zeros((1, PROMPT_WIDTH), np.int32)
    tokens[0, :len(block.tokens)] = block.tokens
    self.cache, match = jp.match_prefix(
        self.cache, jnp.array([seq]), jnp.asarray(tokens), jnp.array([len(block.tokens)]),
        salts=[block.salt], max_prompt_tokens=jnp.array([0]), num_slots=1)
    assert bool(match.ok)
    cached = int(match.num_cached[0])
    self.tokens[seq], self.salts[seq] = list(block.tokens[:cached]), block.salt
    if cached != block.depth * ps:  # its prefix is not all on device: nothing to continue
      event("promote: prefix not on device")
      self.cache = jp.release(self.cache, jnp.array([seq]))
      self.tokens[seq], self.salts[seq] = [], 0
      return
    fits = self._reclaimable() >= 1
    before = self._snapshot()
    self.cache, ok = jp.promote_blocks(self.cache, seq, [block])
    assert bool(ok) == fits
    event(f"promote {'ok' if ok else 'refused'}")
    if not fits:
      jax.tree.map(np.testing.assert_array_equal, self._snapshot(), before)
      return
    self.host.pop(key)
    self.tokens[seq] = list(block.tokens)

  @invariant()
  def host_tier_stays_within_capacity(self):
    stats = self.host.stats()
    assert stats["tiers"][0]["used"] == stats["entries"] * self._block_bytes()
    assert stats["entries"] <= HOST_BLOCKS

  @invariant()
  def structure_holds(self):
    c, p = self.cache, self.cache.prefix
    table_, refs = np.asarray(c.page_table), np.asarray(c.ref_counts)
    np.testing.assert_array_equal(refs, np.bincount(table_[table_ >= 0],
                                                    minlength=self.spec.num_pages))
    cached = np.asarray(p.page_cached)
    free = np.asarray(c.free_pages)[:int(c.num_free)].tolist()
    assert len(set(free)) == len(free)
    assert set(free) == set(np.flatnonzero((refs == 0) & ~cached).tolist())
    assert int(p.num_evictable) == int(np.sum(cached & (refs == 0)))
    live_slots = np.asarray(p.table_pages)
    entries = live_slots[live_slots >= 0]
    assert sorted(entries.tolist()) == np.flatnonzero(cached).tolist()  # one entry each
    assert int(p.num_cached) == len(entries)
    used = int(np.sum(refs > 0))
    assert int(c.num_free) + int(p.num_evictable) + used == self.spec.num_pages
    salts = [jp.block_key(lanes) for lanes in np.asarray(p.page_salt)]  # 64-bit ints
    salts = np.asarray(salts, np.uint64)
    for s in range(self.spec.max_seqs):
      assert int(c.seq_lens[s]) == len(self.tokens[s])
      held = table_[s][table_[s] >= 0]
      # Tenant isolation: every cached block a sequence holds was registered under its salt.
      assert (salts[held][cached[held]] == self.salts[s]).all()

  @invariant()
  def every_sequence_holds_its_own_key_values(self):
    for s, tokens in self.tokens.items():
      k, v = jp.gather_kv(self.cache, 1, s)
      np.testing.assert_array_equal(np.asarray(k)[:len(tokens), 0, 0], key_values(tokens) + 1000)
      np.testing.assert_array_equal(np.asarray(v)[:len(tokens), 0, 1], -key_values(tokens) - 1000)


class CollidingPrefixCacheMachine(PrefixCacheMachine):
  """Every block hashes alike: only verification stands between a request and foreign K/V."""
  block_hash = "constant"


class UnchainedPrefixCacheMachine(PrefixCacheMachine):
  """Equal blocks after different prefixes collide: the parent and generation checks decide."""
  block_hash = "unchained"


TestPrefixCache = PrefixCacheMachine.TestCase
TestCollidingPrefixCache = CollidingPrefixCacheMachine.TestCase
TestUnchainedPrefixCache = UnchainedPrefixCacheMachine.TestCase
