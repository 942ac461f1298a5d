"""The KV-waste benchmark (`benchmarks/bench_waste.py`): what it measures on the real cache is
what an independent NumPy computation says, page size 1 wastes nothing, and its plan serves
every request within the server's limits."""

import numpy as np
import pytest

from benchmarks import bench_waste as bw

SIZES = bw.Sizes(max_seqs=4, max_seq_len=128, num_slots=32)


def _workload() -> bw.Workload:
  """Ten seeded requests (one a second turn of the first), four slots, a token budget of 32 so
  that long prompts prefill in chunks."""
  rng = np.random.default_rng(7)
  n = 10
  prompt = rng.integers(1, 70, n)
  output = rng.integers(1, 40, n)
  arrival = np.sort(rng.integers(0, 30, n))
  follows = np.full(n, -1)
  follows[-1], arrival[-1] = 0, 2
  prompt[-1] = prompt[0] + output[0] + 5
  return bw.Workload("test", prompt, output, arrival, follows, max_seqs=4, max_seq_len=128,
                     token_budget=32)


@pytest.fixture(scope="module")
def planned():
  w = _workload()
  return w, bw.plan(w)


def _lengths_from_extends(schedule: bw.Schedule) -> np.ndarray:
  """Every slot's length after every step, rebuilt from the releases and extends alone."""
  steps, slots = schedule.ids.shape
  length, out = np.zeros(slots, np.int64), np.zeros((steps, slots), np.int64)
  for t in range(steps):
    for s in schedule.release[t]:
      if s >= 0:
        length[s] = 0
    for s, n in zip(schedule.ids[t], schedule.counts[t]):
      if s >= 0:
        length[s] += n
    out[t] = length
  return out


def test_the_plan_serves_every_request_within_the_limits(planned):
  w, schedule = planned
  assert schedule.counts.sum() == (w.prompt + w.output).sum()
  assert schedule.counts.sum(axis=1).max() <= w.token_budget
  assert schedule.counts.sum(axis=1).max() == w.token_budget  # the budget binds: chunked prefill
  assert np.array_equal(_lengths_from_extends(schedule), schedule.lens)
  assert schedule.lens.max() <= w.max_seq_len


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_measured_waste_equals_the_numpy_oracle(planned, page_size):
  _, schedule = planned
  allocated, held = bw.measure(schedule, page_size, SIZES)
  lens = _lengths_from_extends(schedule)
  want_allocated = (np.ceil(lens / page_size) * page_size).sum(axis=1).astype(np.int64)
  np.testing.assert_array_equal(held, lens.sum(axis=1))
  np.testing.assert_array_equal(allocated, want_allocated)
  live = want_allocated > 0
  want = np.mean(1 - lens.sum(axis=1)[live] / want_allocated[live])
  assert bw.waste(allocated, held) == pytest.approx(want, abs=1e-12)
  if page_size > 1:
    assert bw.waste(allocated, held) > 0.01  # partly filled last pages, not a vacuous zero


def test_page_size_one_wastes_nothing(planned):
  w, schedule = planned
  assert bw.measured_waste(w, schedule, 1, SIZES) == (0.0, 0.0)


def test_a_disagreement_with_the_oracle_raises(planned):
  _, schedule = planned
  allocated, held = bw.oracle(schedule, 4)
  bw.check_against_oracle("test", 4, (allocated, held), (allocated, held))
  wrong = allocated.copy()
  wrong[len(wrong) // 2] += 4
  with pytest.raises(RuntimeError, match="allocated slots differ"):
    bw.check_against_oracle("test", 4, (wrong, held), (allocated, held))


def test_contiguous_baselines_waste_more_than_pages(planned):
  w, schedule = planned
  max_len, reserved = bw.contiguous_waste(w, schedule)
  paged, _ = bw.measured_waste(w, schedule, 16, SIZES)
  assert max_len > reserved > 0 and max_len > paged


def test_the_sharegpt_fit_matches_the_published_means():
  prompt, output = bw._filtered_lognormal(bw.fit_sharegpt(), 200_000,  # pylint: disable=protected-access
                                          np.random.default_rng(1234))
  assert prompt.mean() == pytest.approx(bw.SHAREGPT_MEAN_PROMPT, rel=0.01)
  assert output.mean() == pytest.approx(bw.SHAREGPT_MEAN_OUTPUT, rel=0.01)
  assert prompt.max() <= 1024 and (prompt + output).max() <= 2048 and min(prompt.min(),
                                                                          output.min()) >= 4
