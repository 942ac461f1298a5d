"""Routers against a host model of their rule, and the Server on two data shards: every request's
output equals the single-shard Server's (greedy), whichever router spreads them."""

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxpaged as jp
from jaxpaged.models import llama, serving
from jaxpaged.models.requests import Request

_shards = st.lists(st.builds(jp.ShardLoad, st.integers(0, 12), st.sampled_from([0, 4, 8, 16])),
                   min_size=1, max_size=5)


def _oracle_least(shards):
  best = 0
  for i, s in enumerate(shards):
    if s.load < shards[best].load:
      best = i
  return best


def _oracle_prefix(shards, threshold):
  """The rule as SGLang states it: longest cached prefix, ties by load then index; the least
  loaded shard instead when nothing is cached or the hit's shard is too loaded."""
  longest = max(s.cached_tokens for s in shards)
  lightest = _oracle_least(shards)
  if longest == 0:
    return lightest
  holders = [i for i, s in enumerate(shards) if s.cached_tokens == longest]
  best = holders[0]
  for i in holders:
    if shards[i].load < shards[best].load:
      best = i
  return lightest if shards[best].load - shards[lightest].load > threshold else best


@given(_shards, st.sampled_from([0, 1, 2.5, 4, 100]))
def test_prefix_aware_router_follows_its_rule(shards, threshold):
  assert jp.PrefixAwareRouter(threshold).choose([1, 2], shards) == _oracle_prefix(shards,
                                                                                  threshold)


@given(_shards)
def test_least_loaded_router_picks_the_first_least_loaded(shards):
  assert jp.LeastLoadedRouter().choose([1], shards) == _oracle_least(shards)


@given(_shards, st.integers(1, 9))
def test_round_robin_router_takes_shards_in_turn(shards, calls):
  router = jp.RoundRobinRouter()
  assert [router.choose([1], shards) for _ in range(calls)] == [
      i % len(shards) for i in range(calls)]


def test_routers_refuse_bad_input():
  with pytest.raises(jp.JaxPagedError, match="balance_threshold"):
    jp.PrefixAwareRouter(-1)
  with pytest.raises(jp.JaxPagedError, match="shards"):
    jp.LeastLoadedRouter().choose([1], [])
  with pytest.raises(jp.JaxPagedError, match="shards"):
    jp.PrefixAwareRouter().choose([1], [jp.ShardLoad(-1, 0)])


# ----------------------------------------------------------------------------- the server

CONFIG = llama.LlamaConfig(vocab_size=64, hidden=32, num_layers=2, num_heads=2, num_kv_heads=1,
                           ffn=64)
# token_budget 16: one prefill step shape (the prompts, 17-19 tokens, take two chunks), so every
# server compiles one prefill and one decode step (each shard on its own device compiles its own).
SERVER = dict(eos_id=0, num_pages=24, max_seqs=3, page_size=4, max_seq_len=64, token_budget=16)


@pytest.fixture(scope="module")
def params():
  return llama.random_params(CONFIG)


def _workload():
  """Chat-like: a shared system prompt, a few questions, follow-up turns (the conversation so
  far: a prefix hit on the shard that served it)."""
  rng = np.random.default_rng(0)
  system = list(rng.integers(1, 64, 12))
  requests = [Request(system + list(rng.integers(1, 64, int(rng.integers(5, 8)))), 6,
                      arrival=float(i // 2)) for i in range(6)]
  requests += [Request(list(rng.integers(1, 64, 3)), 4, arrival=1.0, follows=i)
               for i in (0, 3, 4)]
  return requests


class _Recording(jp.Router):
  """Records what the server's router saw and chose."""

  def __init__(self, inner):
    self.inner, self.calls = inner, []

  def choose(self, request, shards):
    choice = self.inner.choose(request, shards)
    self.calls.append((list(request), list(shards), choice))
    return choice


@pytest.fixture(scope="module")
def single(params):
  return serving.Server(params, CONFIG, **SERVER).run(_workload(), realtime=False)


@pytest.mark.parametrize("router", [jp.PrefixAwareRouter(2), jp.RoundRobinRouter(),
                                    jp.LeastLoadedRouter()], ids=lambda r: type(r).__name__)
def test_two_data_shards_give_the_single_shard_outputs(params, single, router):
  recording = _Recording(router)
  server = serving.Server(params, CONFIG, **SERVER, mesh=jp.make_mesh(2, 1), router=recording)
  report = server.run(_workload(), realtime=False)
  assert [r.output for r in report.results] == [r.output for r in single.results]
  assert [r.prompt for r in report.results] == [r.prompt for r in single.results]
  # Each shard ran on its own device, and the router's choices spread the requests.
  assert [m.cache.k_pages.devices() for m in server.managers] == [{d} for d in
                                                                  jax.devices()[:2]]
  assert len(recording.calls) == len(report.results)
  assert {choice for _, _, choice in recording.calls} == {0, 1}
  # The report's stats are the shards' summed, and add up to the requests'.
  shards = report.stats["shards"]
  for key in ("prompt_tokens", "device_hit_tokens", "host_hit_tokens", "allocations",
              "used_pages"):
    assert report.stats[key] == sum(s[key] for s in shards)
  assert report.stats["prompt_tokens"] == sum(len(r.prompt) for r in report.results)
  assert report.stats["used_pages"] == 0
  hits = sum(r.cached_tokens for r in report.results)
  assert hits == report.stats["device_hit_tokens"] + report.stats["host_hit_tokens"]


def test_prefix_aware_routing_sends_a_follow_up_to_the_shard_holding_its_conversation(params):
  recording = _Recording(jp.PrefixAwareRouter(balance_threshold=100))  # never rebalance
  server = serving.Server(params, CONFIG, **SERVER, data_shards=2, router=recording)
  workload = _workload()
  report = server.run(workload, realtime=False)
  by_prompt = {tuple(tokens): (shards, choice) for tokens, shards, choice in recording.calls}
  for request, result in zip(workload, report.results):
    shards, choice = by_prompt[tuple(result.prompt)]
    assert choice == _oracle_prefix(shards, 100)
    if request.follows is not None:  # the earlier turn's shard holds most of its prompt
      _, earlier_shard = by_prompt[tuple(report.results[request.follows].prompt)]
      assert shards[choice].cached_tokens == max(s.cached_tokens for s in shards) > 0
      assert choice == earlier_shard


def test_server_refuses_bad_shard_arguments(params):
  with pytest.raises(jp.JaxPagedError, match="data_shards"):
    serving.Server(params, CONFIG, **SERVER, data_shards=0)
  with pytest.raises(jp.JaxPagedError, match="data_shards"):
    serving.Server(params, CONFIG, **SERVER, data_shards=3, mesh=jp.make_mesh(2, 1))
  with pytest.raises(jp.JaxPagedError, match="model=1"):
    serving.Server(params, CONFIG, **SERVER, mesh=jp.make_mesh(2, 2))
  with pytest.raises(jp.JaxPagedError, match="router"):
    serving.Server(params, CONFIG, **SERVER, data_shards=2, router="prefix")

  class Bad(jp.Router):
    def choose(self, request, shards):
      return len(shards)
  server = serving.Server(params, CONFIG, **SERVER, data_shards=2, router=Bad())
  with pytest.raises(jp.JaxPagedError, match="shard index"):
    server.run(_workload(), realtime=False)
