"""Model-based test of `CacheManager` with fault injection.

Long random runs of admit, extend (with and without preemption), reserve + the caller's own
extend, release, swap out/in and gc, against a model that knows each request's tokens, salt and
whereabouts (on device or swapped to host). A tier policy raises at random calls and a pressure
callback raises at random level changes. After a policy fault the manager must be exactly as
before (device arrays, host entries, counters, sequences); a callback fault comes after the
operation completed. After every step: no page leaks, host bytes add up exactly, every swapped
sequence holds its own K/V bit-exactly, every sequence on device holds its own K/V (no false hit).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import jaxpaged as jp
from tests.helpers import key_values

PS, LAYERS, SLOTS = 4, 2, 8
SPEC = jp.CacheSpec(num_layers=LAYERS, num_kv_heads=1, head_dim=2, page_size=PS, num_pages=12,
                    max_seqs=4, max_pages_per_seq=6, prefix_caching=True)
FAMILIES = [[7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2],
            [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3],
            [7, 1, 8, 2, 6, 6, 6, 6, 1, 1, 1, 1, 2, 2, 2, 2]]
SALTS = [0, 0, 1 << 32]


class PolicyFault(Exception):
  pass


class CallbackFault(Exception):
  pass


class FaultyPolicy:
  """LRU, except that it raises at the call the test arms."""

  def __init__(self):
    self.lru = jp.LRUPolicy()
    self.countdown = None

  def _maybe_raise(self):
    if self.countdown is not None:
      self.countdown -= 1
      if self.countdown < 0:
        self.countdown = None
        raise PolicyFault()

  def should_promote(self, key, stats):
    self._maybe_raise()
    return self.lru.should_promote(key, stats)

  def eviction_candidate(self, tier, stats):
    self._maybe_raise()
    return self.lru.eviction_candidate(tier, stats)


class ManagerMachine(RuleBasedStateMachine):

  def __init__(self):
    super().__init__()
    self.policy = FaultyPolicy()
    self.manager = jp.CacheManager(SPEC, host_bytes=7 * SPEC.page_bytes, policy=self.policy)
    self.levels = []  # what the recording callback heard
    self.callback_armed = False
    self.manager.on_pressure(self._faulty_callback)
    self.manager.on_pressure(lambda old, new: self.levels.append(new))
    self.seqs = {}  # seq id -> {"tokens", "salt", "where": "device" | "host"}
    self.pressure_known = True  # the last page change went through the manager

  def _faulty_callback(self, old, new):
    del old, new
    if self.callback_armed:
      self.callback_armed = False
      raise CallbackFault()

  # --------------------------------------------------------------------------- helpers

  def _state(self):
    """Everything observable about the manager, to compare before and after a fault."""
    m = self.manager
    store = {key: (m.store.peek(key), m.store.access_stats(key)) for key in m.store.keys()}
    return (jax.tree.map(np.asarray, m.cache), store, m.store.stats(), dict(m.counters),
            m.active, m.swapped, m.pressure)

  def _assert_same(self, before):
    after = self._state()
    jax.tree.map(np.testing.assert_array_equal, after[0], before[0])
    assert after[1].keys() == before[1].keys()
    for key, (value, stats) in after[1].items():
      assert value is before[1][key][0] and stats == before[1][key][1]
    assert after[2:] == before[2:]

  def _write(self, seq, start, slots, count):
    """K/V of tokens[start:start+count] of ``seq`` at ``slots`` (what a model step stores)."""
    values = np.zeros(slots.shape[0], np.float32)
    values[:count] = key_values(self.seqs[seq]["tokens"])[start:start + count]
    slots = np.where(np.arange(slots.shape[0]) < count, np.asarray(slots), -1)
    for layer in range(LAYERS):
      kv = jnp.broadcast_to(jnp.asarray(values + 1000 * layer)[:, None, None],
                            (slots.shape[0], 1, 2))
      self.manager.cache = jp.write_kv(self.manager.cache, layer, kv, -kv, jnp.asarray(slots))

  def _call(self, fn, *args, **kwargs):
    """Runs a manager operation. Returns ("ok", result), ("policy", None) after a policy fault
    (checked: nothing changed), or ("callback", None) after a callback fault (it completed)."""
    before = self._state()
    self.pressure_known = True
    try:
      return "ok", fn(*args, **kwargs)
    except PolicyFault:
      event("policy fault")
      self._assert_same(before)
      return "policy", None
    except CallbackFault:
      event("callback fault")
      return "callback", None
    except jp.TierError:  # the host cannot take what preemption or a swap out needs
      event("refused: host full")
      self._assert_same(before)
      return "refused", None

  def _moved_to_host(self, preempted):
    for s in preempted:
      self.seqs[s]["where"] = "host"

  def _on_device(self):
    return sorted(s for s, q in self.seqs.items() if q["where"] == "device")

  # --------------------------------------------------------------------------- rules

  @rule(countdown=st.integers(0, 6))
  def arm_policy_fault(self, countdown):
    self.policy.countdown = countdown

  @rule()
  def arm_callback_fault(self):
    self.callback_armed = True

  @rule(data=st.data())
  def admit(self, data):
    family = data.draw(st.sampled_from(FAMILIES))
    tokens = family[:data.draw(st.integers(1, 16))] + data.draw(
        st.lists(st.integers(0, 9), max_size=3))
    salt = data.draw(st.sampled_from(SALTS))
    chunk = data.draw(st.sampled_from([None, 5]))
    active_before = set(self.manager.active)
    outcome, admission = self._call(self.manager.admit, tokens, salt=salt,
                                    max_prompt_tokens=chunk, num_slots=24)
    if outcome == "callback":  # admitted, but the caller never saw the slots: give it back
      (seq,) = set(self.manager.active) - active_before
      self.callback_armed = False
      self.manager.release([seq])
      return
    if outcome != "ok" or admission is None:
      event("admit refused" if outcome == "ok" else "admit faulted")
      return
    seq = admission.seq_id
    assert seq not in self.seqs
    self.seqs[seq] = dict(tokens=tokens[:admission.num_cached + admission.num_new], salt=salt,
                          where="device")
    event("admit with a host hit" if admission.host_hit_tokens else
          "admit with a device hit" if admission.num_cached else "admit")
    self._write(seq, admission.num_cached, admission.slots, admission.num_new)

  @rule(data=st.data())
  def extend(self, data):
    live = [s for s in self._on_device() if len(self.seqs[s]["tokens"]) < SPEC.max_seq_len]
    if not live:
      return
    seq = data.draw(st.sampled_from(live))
    room = SPEC.max_seq_len - len(self.seqs[seq]["tokens"])
    new = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=min(4, room)))
    preempt = data.draw(st.booleans())
    outcome, result = self._call(
        self.manager.extend, [seq], [len(new)], tokens=np.pad(new, (0, SLOTS - len(new))),
        num_slots=SLOTS, preempt=preempt)
    if outcome == "callback":  # it completed; the caller lost the slots: read them back
      event("extend completed before a callback fault")
      self._reconcile()
      start = len(self.seqs[seq]["tokens"])
      self.seqs[seq]["tokens"] += new
      table = np.asarray(self.manager.cache.page_table)[seq]
      slots = [table[p // PS] * PS + p % PS for p in range(start, start + len(new))]
      return self._write(seq, start, np.asarray(slots + [-1] * (SLOTS - len(new))), len(new))
    if outcome != "ok":
      return
    slots, ok, preempted = result
    event(f"extend {'ok' if ok else 'refused'}{' with preemption' if preempted else ''}")
    if not bool(ok):
      assert not preempted
      return
    self._moved_to_host(preempted)
    start = len(self.seqs[seq]["tokens"])
    self.seqs[seq]["tokens"] += new
    self._write(seq, start, slots, len(new))

  @rule(data=st.data())
  def reserve_then_own_extend(self, data):
    """What a model step does: reserve, then extend inside its own step."""
    live = [s for s in self._on_device() if len(self.seqs[s]["tokens"]) < SPEC.max_seq_len]
    if not live:
      return
    seq = data.draw(st.sampled_from(live))
    n = data.draw(st.integers(1, min(3, SPEC.max_seq_len - len(self.seqs[seq]["tokens"]))))
    outcome, result = self._call(self.manager.reserve, [seq, -1], [n, 0], num_slots=SLOTS,
                                 preempt=data.draw(st.booleans()))
    if outcome == "callback":
      return self._reconcile()
    if outcome != "ok" or not result[0]:
      return
    self._moved_to_host(result[1])
    new = [data.draw(st.integers(0, 9)) for _ in range(n)]
    self.manager.cache, slots, ok = jp.extend(
        self.manager.cache, jnp.array([seq, -1]), jnp.array([n, 0]), num_slots=SLOTS,
        tokens=jnp.asarray(np.pad(new, (0, SLOTS - n))))
    assert bool(ok)  # reserve made room
    self.pressure_known = False  # pages were taken behind the manager's back
    start = len(self.seqs[seq]["tokens"])
    self.seqs[seq]["tokens"] += new
    self._write(seq, start, slots, n)

  @rule(data=st.data())
  def release(self, data):
    if not self.seqs:
      return
    seq = data.draw(st.sampled_from(sorted(self.seqs)))
    outcome, _ = self._call(self.manager.release, [seq])
    if outcome != "policy":
      del self.seqs[seq]

  @rule(data=st.data())
  def swap_out(self, data):
    on_device = self._on_device()
    if not on_device:
      return
    seq = data.draw(st.sampled_from(on_device))
    outcome, _ = self._call(self.manager.swap_out, [seq])
    if outcome in ("ok", "callback"):
      self.seqs[seq]["where"] = "host"

  @rule(data=st.data())
  def swap_in(self, data):
    on_host = sorted(s for s, q in self.seqs.items() if q["where"] == "host")
    if not on_host:
      return
    seq = data.draw(st.sampled_from(on_host))
    outcome, result = self._call(self.manager.swap_in, [seq])
    if outcome == "callback":
      return self._reconcile()
    if outcome == "ok":
      event(f"swap in {'ok' if result[0] else 'refused'}")
      if result[0]:
        self.seqs[seq]["where"] = "device"

  @rule()
  def gc(self):
    outcome, _ = self._call(self.manager.gc)
    if outcome == "ok":
      assert self.manager.stats()["cached_free_pages"] == 0

  def _reconcile(self):
    """After a callback fault the operation completed: read where sequences are now."""
    for s in self.manager.swapped:
      self.seqs[s]["where"] = "host"
    for s in self.manager.active:
      self.seqs[s]["where"] = "device"
    self.callback_armed = False

  # --------------------------------------------------------------------------- invariants

  @invariant()
  def sequences_are_where_the_model_says(self):
    assert self.manager.active == self._on_device()
    assert self.manager.swapped == sorted(s for s, q in self.seqs.items() if q["where"] == "host")

  @invariant()
  def no_page_leaks(self):
    c, p = self.manager.cache, self.manager.cache.prefix
    table, refs = np.asarray(c.page_table), np.asarray(c.ref_counts)
    np.testing.assert_array_equal(refs, np.bincount(table[table >= 0], minlength=SPEC.num_pages))
    cached = np.asarray(p.page_cached)
    free = np.asarray(c.free_pages)[:int(c.num_free)].tolist()
    assert len(set(free)) == len(free)
    assert set(free) == set(np.flatnonzero((refs == 0) & ~cached).tolist())
    assert int(c.num_free) + int(p.num_evictable) + int(np.sum(refs > 0)) == SPEC.num_pages
    for s in range(SPEC.max_seqs):  # released and swapped slots hold nothing
      expected = len(self.seqs[s]["tokens"]) if s in self._on_device() else 0
      assert int(c.seq_lens[s]) == expected

  @invariant()
  def host_bytes_add_up(self):
    store = self.manager.store
    (tier,) = store.stats()["tiers"]
    total = 0
    for key in store.keys():
      value = store.peek(key)
      assert store.access_stats(key).size == value.nbytes
      total += value.nbytes
    assert tier["used"] == total <= tier["capacity"]

  @invariant()
  def swapped_sequences_are_restorable_bit_exactly(self):
    for s, q in self.seqs.items():
      if q["where"] != "host":
        continue
      swapped = self.manager.store.peek(("seq", s))
      n = len(q["tokens"])
      assert swapped.length == n and swapped.salt == q["salt"]
      np.testing.assert_array_equal(np.asarray(swapped.tokens)[:n], q["tokens"])
      for layer in range(LAYERS):
        k = np.asarray(swapped.k)[layer, 0].reshape(-1, 2)[:n, 0]
        np.testing.assert_array_equal(k, key_values(q["tokens"]) + 1000 * layer)

  @invariant()
  def every_sequence_on_device_holds_its_own_key_values(self):
    for s in self._on_device():
      tokens = self.seqs[s]["tokens"]
      for layer in range(LAYERS):
        k, v = jp.gather_kv(self.manager.cache, layer, s)
        np.testing.assert_array_equal(np.asarray(k)[:len(tokens), 0, 0],
                                      key_values(tokens) + 1000 * layer)
        np.testing.assert_array_equal(np.asarray(v)[:len(tokens), 0, 1],
                                      -key_values(tokens) - 1000 * layer)

  @invariant()
  def pressure_matches_the_pages_in_use(self):
    if not self.pressure_known:
      return
    used = self.manager.stats()["used_pages"] / SPEC.num_pages
    level = jp.MemoryPressure(sum(used >= t for t in self.manager.thresholds))
    assert self.manager.pressure == level
    if self.levels:
      assert self.levels[-1] == level  # the last change heard is the current level


TestManager = ManagerMachine.TestCase


def test_the_manager_owns_its_cache_and_donates_it():
  """The manager's steps update its cache in place (the old buffers are consumed)."""
  manager = jp.CacheManager(SPEC, host_bytes=1 << 20)
  before = manager.cache
  admission = manager.admit(list(range(1, 10)))
  assert admission is not None and before.k_pages.is_deleted()
  with pytest.raises(jp.JaxPagedError, match="was donated"):
    jp.release(before, [0])
