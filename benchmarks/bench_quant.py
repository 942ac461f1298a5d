"""8-bit K/V benchmark (KV compression issue, part 1): what 8-bit pages buy and what they cost.

- Capacity: bytes per token (scales included) and sequences of a given length that fit in the
  same pool bytes, float32 / bfloat16 / int8 / fp8, for SmolLM2-135M's K/V shape (30 layers, 3
  KV heads, head_dim 64) and for 8 KV heads x 128.
- Decode attention time per K/V dtype (XLA path, B8 at 2k tokens and B1 at 32k, 32 query / 8 KV
  heads, D128, page 64, pages in random order, as `bench_attention`), interleaved in one run:
  ratios to float32 and to bfloat16, the per-chunk dequantization included; and the 8-bit chunk
  cap (``block_kv`` 256, 512, 1024 against the default, `attention_xla.default_block_kv`).
- Serving: the chat workload of `bench_serve` in a fixed pool byte budget, float32 vs int8 K/V
  (int8 gets ~3.76x the pages): throughput, swaps, TTFT.
- Accuracy: SmolLM2-135M teacher-forced on English prose (sections of the Python Language
  Reference, shipped with CPython as `pydoc_data.topics`), float32 K/V vs each 8-bit format
  (per-token scales; and fp8 e4m3 with static per-layer scales calibrated from the float32
  run's K/V amax, vLLM style): top-1 next-token agreement with the float32-K/V model and
  perplexity change. Attention outputs against a float64 NumPy oracle, on random K/V and on the
  model's own K/V and queries.

The accuracy functions (`teacher_forced`, `accuracy`, `attention_errors`) are also what
``tests/test_quant_model.py`` asserts with.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from benchmarks.harness import Row, block, median_times_interleaved
from jaxpaged._src import attention_xla
from jaxpaged._src.spec import QUANTIZED_DTYPES
from jaxpaged.models import llama

# The texts: sections of the Python Language Reference (CPython's `pydoc_data.topics`, the
# text of `help("with")` etc.), plain English technical prose, offline on every interpreter.
TEXT_TOPICS = ("with", "class", "function")
TEXT_TOKENS = 384  # tokens of each text (the first ones)

# K/V formats compared with float32: (label, dtype, static scales from calibration?)
FORMATS = (("int8", jnp.int8, False), ("fp8 e4m3", jnp.float8_e4m3fn, False),
           ("fp8 e5m2", jnp.float8_e5m2, False), ("fp8 e4m3 static", jnp.float8_e4m3fn, True))
# The targets: top-1 agreement with the float32-K/V model, perplexity change.
AGREEMENT_TARGETS = {"int8": 0.99, "fp8 e4m3": 0.98, "fp8 e4m3 static": 0.98}
PERPLEXITY_TARGET = 0.01  # |ppl / ppl(float32) - 1|


# ----------------------------------------------------------------------------- accuracy

def texts(tokenizer, topics=TEXT_TOPICS, num_tokens: int = TEXT_TOKENS) -> list[list[int]]:
  """The first ``num_tokens`` tokens of each Language Reference section in ``topics``."""
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  rows = [tokenizer.encode(pydoc_data.topics.topics[t].strip())[:num_tokens] for t in topics]
  assert all(len(r) == num_tokens for r in rows), [len(r) for r in rows]
  return rows


@functools.partial(jax.jit, static_argnames=("config", "keep_q"))
def _teacher_forced(params, cache, tokens, seq_ids, q_lens, *, config, keep_q):
  """One prefill of every row, with the logits of every token (not only each row's last).
  Returns ``(cache, argmax int32[T], log p(next token) float32[T], top-2 margin float32[T],
  slots int32[T], q [L, T, Hq, D] or None)``; the last position of a row predicts nothing (its
  log p is that of token 0, ignored by the caller)."""
  cache, slots, positions, ok = llama._append(cache, tokens, seq_ids, q_lens)  # pylint: disable=protected-access
  layer = functools.partial(llama._layer, config=config, positions=positions, slots=slots,  # pylint: disable=protected-access
                            seq_ids=seq_ids, q_lens=q_lens, decode=False, impl="xla",
                            dtype=params["embed"].dtype)

  def body(carry, weights):
    q = None
    if keep_q:  # the layer's queries, as `llama._layer` computes them
      h = llama.rms_norm(carry[0], weights["attn_norm"], config.norm_eps)
      q = llama.rope((h @ weights["wq"]).reshape(tokens.shape[0], -1, config.head_dim),
                     positions, config.rope_theta)
    return layer(carry, weights)[0], q

  (x, cache, _), qs = jax.lax.scan(body, (params["embed"][tokens], cache, jnp.int32(0)),
                                   params["layers"])
  x = llama.rms_norm(x, params["norm"], config.norm_eps)
  unembed = params["unembed"] if "unembed" in params else params["embed"].T
  logp = jax.nn.log_softmax((x @ unembed).astype(jnp.float32), axis=-1)
  following = jnp.concatenate([tokens[1:], tokens[:1]])
  top2 = jax.lax.top_k(logp, 2)[0]
  return (cache, jnp.argmax(logp, -1).astype(jnp.int32),
          jnp.take_along_axis(logp, following[:, None], -1)[:, 0], top2[:, 0] - top2[:, 1],
          slots, qs, ok)


@dataclasses.dataclass
class Run:
  """One teacher-forced run over the texts."""
  argmax: np.ndarray  # [N] the model's top-1 next token at every predicting position
  logp: np.ndarray  # [N] log p of the true next token there
  margin: np.ndarray  # [N] top-1 minus top-2 log-probability
  cache: jp.PagedKVCache
  slots: np.ndarray  # [T] cache slot of every token
  q: np.ndarray | None  # [L, T, Hq, D] queries (float32 run only)

  @property
  def perplexity(self) -> float:
    return float(np.exp(-self.logp.mean()))


def teacher_forced(params, config, rows: list[list[int]], dtype=jnp.float32, *,
                   static_scales=None, keep_q: bool = False, page_size: int = 16) -> Run:
  """SmolLM2 (or any `llama` model) over ``rows`` in one prefill, K/V stored in ``dtype``."""
  lengths = [len(r) for r in rows]
  spec = dataclasses.replace(
      config.cache_spec(num_pages=sum(-(-n // page_size) for n in lengths), max_seqs=len(rows),
                        max_seq_len=max(lengths), page_size=page_size, dtype=dtype),
      static_scales=static_scales)
  tokens = jnp.asarray(np.concatenate(rows), jnp.int32)
  cache, argmax, logp, margin, slots, q, ok = _teacher_forced(
      params, jp.init_cache(spec), tokens, jnp.arange(len(rows), dtype=jnp.int32),
      jnp.asarray(lengths, jnp.int32), config=config, keep_q=keep_q)
  assert bool(ok)
  predicting = np.concatenate([np.arange(n) < n - 1 for n in lengths])  # a row's last: no
  return Run(np.asarray(argmax)[predicting], np.asarray(logp)[predicting],
             np.asarray(margin)[predicting], cache, np.asarray(slots),
             None if q is None else np.asarray(q))


def calibrated_scales(run: Run, dtype) -> tuple[tuple[float, float], ...]:
  """Static (k, v) scales per layer from a float32 run's K/V: ``amax / qmax`` (vLLM's fp8
  calibration), so the largest value seen is stored at the format's largest magnitude."""
  qmax = QUANTIZED_DTYPES[jnp.dtype(dtype)]
  amax = [np.abs(np.asarray(p)).max(axis=(1, 2, 3, 4)) for p in (run.cache.k_pages,
                                                                run.cache.v_pages)]
  return tuple((float(k) / qmax, float(v) / qmax) for k, v in zip(*amax))


def accuracy(params, config, rows, formats=FORMATS) -> tuple[Run, dict[str, dict]]:
  """The float32-K/V run and, per 8-bit format, its agreement with it and perplexity change.
  Each entry: agreement, perplexity, perplexity_change, disagreements, and the float32 model's
  median top-1 - top-2 margin at the disagreeing positions (near-ties: small)."""
  base = teacher_forced(params, config, rows, keep_q=True)
  results = {}
  for label, dtype, static in formats:
    scales = calibrated_scales(base, dtype) if static else None
    run = teacher_forced(params, config, rows, dtype, static_scales=scales)
    differ = run.argmax != base.argmax
    results[label] = dict(
        agreement=float(1 - differ.mean()), perplexity=run.perplexity,
        perplexity_change=run.perplexity / base.perplexity - 1, disagreements=int(differ.sum()),
        positions=int(differ.size),
        disagreeing_margin=float(np.median(base.margin[differ])) if differ.any() else 0.0,
        median_margin=float(np.median(base.margin)), dtype=dtype, static_scales=scales)
  return base, results


# ----------------------------------------------------------------------------- attention oracle

def _oracle(q, k, v, lengths) -> np.ndarray:
  """float64 causal attention of ``q [T, Hq, D]`` over ``k, v [T, Hkv, D]`` (rows of
  ``lengths`` concatenated, each token seeing its row's tokens up to itself)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[1] // k.shape[1]
  out, start = np.zeros_like(q), 0
  for n in lengths:
    rows = slice(start, start + n)
    kk, vv = np.repeat(k[rows], group, 1), np.repeat(v[rows], group, 1)  # [n, Hq, D]
    s = np.einsum("thd,shd->hts", q[rows], kk) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((n, n), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[rows] = np.einsum("hts,shd->thd", p, vv)
    start += n
  return out


@functools.partial(jax.jit, static_argnames=("spec",))
def _write_and_attend(k, v, q, seq_ids, lengths, *, spec):
  """Fresh cache of ``spec``: the rows' K/V ``[L, T, Hkv, D]`` written, then every layer's
  ragged attention of ``q [L, T, Hq, D]`` (causal) over them."""
  cache, slots, ok = jp.extend(jp.init_cache(spec), seq_ids, lengths, num_slots=k.shape[1])
  for layer in range(spec.num_layers):
    cache = jp.write_kv(cache, layer, k[layer], v[layer], slots)
  out = jax.lax.map(lambda args: jp.ragged_paged_attention(
      args[1], cache, args[0], seq_ids, lengths, impl="xla"),
      (jnp.arange(spec.num_layers, dtype=jnp.int32), q))
  return out, ok


def attention_errors(k, v, q, lengths, dtypes, *, static_scales=None, page_size: int = 16,
                     reference=None) -> dict[str, tuple[float, float]]:
  """Relative error ``|out - oracle| / |oracle|`` (per query token and head) of paged attention
  over K/V stored in each dtype, against float64 attention over the float32 K/V: ``{dtype
  name: (max, mean)}``. ``k, v [L, T, Hkv, D]``, ``q [L, T, Hq, D]``; ``static_scales``: label
  -> scales, for extra static-scale entries (``{label: (dtype, scales)}``); ``reference``:
  the ``(k, v)`` of the oracle, if not ``k, v``."""
  num_layers, num_tokens, heads, head_dim = k.shape
  lengths = list(lengths)
  ref_k, ref_v = (k, v) if reference is None else reference
  oracle = np.stack([_oracle(q[l], ref_k[l], ref_v[l], lengths) for l in range(num_layers)])
  norm = np.linalg.norm(oracle, axis=-1)
  cases = {jnp.dtype(d).name: (d, None) for d in dtypes}
  cases.update(static_scales or {})
  errors = {}
  for label, (dtype, scales) in cases.items():
    spec = jp.CacheSpec(num_layers=num_layers, num_kv_heads=heads, head_dim=head_dim,
                        page_size=page_size, num_pages=sum(-(-n // page_size) for n in lengths),
                        max_seqs=len(lengths), max_pages_per_seq=-(-max(lengths) // page_size),
                        dtype=dtype, static_scales=scales)
    out, ok = _write_and_attend(jnp.asarray(k), jnp.asarray(v), jnp.asarray(q),
                                jnp.arange(len(lengths), dtype=jnp.int32),
                                jnp.asarray(lengths, jnp.int32), spec=spec)
    assert bool(ok)
    rel = np.linalg.norm(np.asarray(out, np.float64) - oracle, axis=-1) / np.maximum(norm, 1e-30)
    errors[label] = (float(rel.max()), float(rel.mean()))
  return errors


def error_split(k, v, q, lengths, dtypes) -> dict[str, tuple[float, float]]:
  """Which of K and V the error comes from: attention over float32 pools holding K (or V)
  rounded through each 8-bit format (per-token scales) and the other exact, as
  `attention_errors` reports it: ``{"<dtype> K only" | "<dtype> V only": (max, mean)}``."""
  from jaxpaged._src import quant  # pylint: disable=g-import-not-at-top
  errors = {}
  for dtype in dtypes:
    spec = jp.CacheSpec(num_layers=1, num_kv_heads=1, head_dim=k.shape[-1], page_size=1,
                        num_pages=1, max_seqs=1, max_pages_per_seq=1, dtype=dtype)
    rounded = lambda x: np.asarray(quant.dequantize(*quant.quantize(jnp.asarray(x), spec, 0, 0)))
    name = jnp.dtype(dtype).name
    errors[f"{name} K only"] = attention_errors(rounded(k), v, q, lengths, (jnp.float32,),
                                                reference=(k, v))["float32"]
    errors[f"{name} V only"] = attention_errors(k, rounded(v), q, lengths, (jnp.float32,),
                                                reference=(k, v))["float32"]
  return errors


def model_kv(run: Run) -> tuple[np.ndarray, np.ndarray]:
  """A float32 run's K/V in token order, ``[L, T, Hkv, D]`` each."""
  ps = run.cache.spec.page_size
  page, offset = run.slots // ps, run.slots % ps
  return tuple(np.moveaxis(np.asarray(p)[:, :, page, offset], 2, 1)
               for p in (run.cache.k_pages, run.cache.v_pages))


# ----------------------------------------------------------------------------- capacity

CAPACITY_DTYPES = (("f32", jnp.float32), ("bf16", jnp.bfloat16), ("int8", jnp.int8),
                   ("fp8 e4m3", jnp.float8_e4m3fn))
SHAPES = (("SmolLM2 (30 layers, 3 KV heads x 64)", 30, 3, 64), ("8 KV heads x 128, one layer", 1, 8, 128))


def _capacity_rows(pool_bytes: int = 1 << 30, seq_len: int = 2048,
                   page_size: int = 16) -> list[Row]:
  """Bytes per token and sequences of ``seq_len`` tokens that fit in ``pool_bytes``."""
  rows = []
  for shape, layers, heads, dim in SHAPES:
    fits = {}
    for label, dtype in CAPACITY_DTYPES:
      spec = jp.CacheSpec(num_layers=layers, num_kv_heads=heads, head_dim=dim,
                          page_size=page_size, num_pages=1, max_seqs=1, max_pages_per_seq=1,
                          dtype=dtype)
      pages = pool_bytes // spec.page_bytes
      fits[label] = pages // -(-seq_len // page_size)
      rows += [Row("quant", f"{shape}: {label} bytes per token (scales included)",
                   spec.token_bytes, "bytes"),
               Row("quant", f"{shape}: {label} sequences of {seq_len} tokens in "
                   f"{pool_bytes >> 20} MiB", fits[label], "seqs")]
    for label in ("int8", "fp8 e4m3"):
      for base, target in (("f32", 3.5), ("bf16", 1.8)):
        ratio = fits[label] / fits[base]
        rows.append(Row("quant", f"{shape}: {label} / {base} sequences, same bytes", ratio, "x",
                        f">= {target}", ratio >= target))
  return rows


# ----------------------------------------------------------------------------- decode attention

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 64
TIME_DTYPES = (("f32", jnp.float32), ("bf16", jnp.bfloat16), ("int8", jnp.int8),
               ("fp8 e4m3", jnp.float8_e4m3fn), ("fp8 e5m2", jnp.float8_e5m2))


def _attention_case(dtype, batch: int, tokens: int, key):
  """A one-layer cache of ``batch`` sequences of ``tokens`` random K/V on pages in random order,
  written through `write_kv` (8-bit: quantized per token), and a query."""
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, page_size=PAGE,
                      num_pages=batch * tokens // PAGE, max_seqs=batch,
                      max_pages_per_seq=tokens // PAGE, dtype=dtype)
  cache = jp.init_cache(spec)
  cache = dataclasses.replace(cache, free_pages=jnp.asarray(
      np.random.default_rng(0).permutation(spec.num_pages).astype(np.int32)))
  ids = jnp.arange(batch, dtype=jnp.int32)
  cache, slots, ok = jp.extend(cache, ids, jnp.full((batch,), tokens, jnp.int32),
                               num_slots=batch * tokens)
  assert bool(ok)
  k1, k2, k3 = jax.random.split(key, 3)
  shape = (batch * tokens, KV_HEADS, HEAD_DIM)
  write = jax.jit(jp.write_kv, donate_argnums=0)
  store = jnp.float32 if spec.quantized else dtype
  cache = write(cache, 0, jax.random.normal(k1, shape, store), jax.random.normal(k2, shape, store),
                slots)
  q = jax.random.normal(k3, (batch, Q_HEADS, HEAD_DIM), jnp.float32 if spec.quantized else dtype)
  return cache, q, ids


def _attention_rows(batch: int, tokens: int, repeats: int, caps=(256, 512, 1024)) -> list[Row]:
  """Decode attention time per K/V dtype (same random K/V values), interleaved; and the 8-bit
  chunk cap (int8 with ``block_kv`` 256 / 512 / 1024 against the default)."""
  where = f"B{batch} x {tokens // 1024}k tokens"
  paged = jax.jit(functools.partial(jp.paged_attention, impl="xla"),
                  static_argnames=("block_kv",))
  contenders, cases = {}, {}
  for label, dtype in TIME_DTYPES:
    cases[label] = _attention_case(dtype, batch, tokens, jax.random.key(0))
    cache, q, ids = cases[label]
    contenders[label] = functools.partial(lambda c, q, i: block(paged(q, c, 0, i)), cache, q,
                                          ids)
  cache, q, ids = cases["int8"]
  for cap in caps:
    contenders[f"int8 block_kv {cap}"] = functools.partial(
        lambda b: block(paged(q, cache, 0, ids, block_kv=b)), cap)
  times = median_times_interleaved(contenders, repeats=repeats)
  rows = [Row("quant", f"decode attention {where}: {name}", t * 1e3, "ms")
          for name, t in times.items()]
  for label, _ in TIME_DTYPES[1:]:
    rows.append(Row("quant", f"decode attention {where}: {label} / f32 time",
                    times[label] / times["f32"], "x"))
  for label, _ in TIME_DTYPES[2:]:
    rows.append(Row("quant", f"decode attention {where}: {label} / bf16 time",
                    times[label] / times["bf16"], "x"))
  default = attention_xla.default_block_kv(tokens, batch, quantized=True)
  cap_times = {cap: times[f"int8 block_kv {cap}"] for cap in caps}
  cap_times.setdefault(default, times["int8"])
  fastest = min(cap_times, key=cap_times.get)
  rows += [Row("quant", f"decode attention {where}: int8 block_kv {cap} / default "
               f"({default}) time", times[f"int8 block_kv {cap}"] / times["int8"], "x")
           for cap in caps]
  rows.append(Row("quant", f"decode attention {where}: fastest int8 chunk (keys a step)",
                  fastest, "tokens"))
  rows.append(Row("quant", f"decode attention {where}: default int8 chunk", default, "tokens"))
  return rows


# ----------------------------------------------------------------------------- serving

SERVE_BASE_PAGES = 40  # float32 pages of the budget: `bench_serve`'s 1x pool


def _serve_rows(params, config, tokenizer, quick: bool) -> list[Row]:
  """The chat workload in the bytes of `SERVE_BASE_PAGES` float32 pages: float32 vs int8 K/V."""
  from examples.chat_workload import chat_workload  # pylint: disable=g-import-not-at-top
  from jaxpaged.models import serving  # pylint: disable=g-import-not-at-top
  num_requests, new_tokens, repeats = (8, 16, 1) if quick else (16, 32, 3)
  requests = chat_workload(tokenizer, num_requests=num_requests, max_new_tokens=new_tokens,
                           mean_gap=0.25)
  budget = SERVE_BASE_PAGES * config.cache_spec(num_pages=1, max_seqs=1, max_seq_len=16,
                                                dtype=jnp.float32).page_bytes
  servers = {}
  for label, dtype in (("f32", jnp.float32), ("int8", jnp.int8)):
    page_bytes = config.cache_spec(num_pages=1, max_seqs=1, max_seq_len=16,
                                   dtype=dtype).page_bytes
    servers[label] = serving.Server(params, config, eos_id=tokenizer.eos_token_id,
                                    num_pages=budget // page_bytes, max_seqs=16,
                                    token_budget=128, cache_dtype=dtype)
  for server in servers.values():
    server.warmup(requests)
  reports = {label: [] for label in servers}
  for _ in range(repeats):
    for label, server in servers.items():
      reports[label].append(server.run(requests))
  rows, figures = [], {}
  for label, runs in reports.items():
    median = lambda f: statistics.median(f(r) for r in runs)
    last = runs[-1]
    figures[label] = (median(lambda r: r.throughput), median(lambda r: r.mean_ttft))
    where = f"serve {len(requests)} requests, {budget / 2**20:.2f} MiB pool: {label}"
    rows += [
        Row("quant", f"{where} pages", servers[label].spec.num_pages, "pages"),
        Row("quant", f"{where} throughput", figures[label][0], "tok/s"),
        Row("quant", f"{where} mean TTFT", figures[label][1], "s"),
        Row("quant", f"{where} swap-outs, recomputations", last.stats["swap_outs"] +
            sum(res.admissions - 1 for res in last.results), "count"),
        Row("quant", f"{where} peak pages in use",
            max(t["used_pages"] for t in last.timeline), "pages"),
    ]
  same = np.mean([a.output == b.output for a, b in zip(reports["f32"][-1].results,
                                                       reports["int8"][-1].results)])
  return rows + [
      Row("quant", "serve: int8 / f32 throughput, same pool bytes",
          figures["int8"][0] / figures["f32"][0], "x"),
      Row("quant", "serve: f32 / int8 mean TTFT, same pool bytes",
          figures["f32"][1] / figures["int8"][1], "x"),
      Row("quant", "serve: requests whose int8 output equals f32's", float(same), "fraction"),
  ]


# ----------------------------------------------------------------------------- accuracy rows

def _accuracy_rows(params, config, tokenizer, quick: bool) -> list[Row]:
  rows_tokens = texts(tokenizer)
  base, results = accuracy(params, config, rows_tokens)
  where = (f"SmolLM2, {len(rows_tokens)} Language Reference texts x {TEXT_TOKENS} tokens "
           f"(teacher-forced)")
  rows = [Row("quant", f"{where}: f32 K/V perplexity", base.perplexity, "ppl"),
          Row("quant", f"{where}: f32 median top-1 - top-2 log-prob margin",
              results["int8"]["median_margin"], "nats")]
  for label, r in results.items():
    target = AGREEMENT_TARGETS.get(label)
    rows += [
        Row("quant", f"{label}: top-1 agreement with f32 K/V", r["agreement"], "fraction",
            f">= {target}" if target else "", None if target is None else
            r["agreement"] >= target),
        Row("quant", f"{label}: perplexity change vs f32 K/V", r["perplexity_change"], "rel",
            f"|x| <= {PERPLEXITY_TARGET}", abs(r["perplexity_change"]) <= PERPLEXITY_TARGET),
        Row("quant", f"{label}: f32 median top-2 margin where they disagree",
            r["disagreeing_margin"], "nats"),
    ]
  # Attention against float64: the model's own K/V and queries, and random normal K/V.
  k, v = model_kv(base)
  layers = slice(None, None, 3) if quick else slice(None)
  static = {"fp8 e4m3 static": (jnp.float8_e4m3fn,
                                calibrated_scales(base, jnp.float8_e4m3fn)[layers])}
  dtypes = (jnp.float32, jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2)
  lengths = [len(r) for r in rows_tokens]
  real = attention_errors(k[layers], v[layers], base.q[layers], lengths, dtypes,
                          static_scales=static)
  rng = np.random.default_rng(0)
  shape = (4, sum(lengths), config.num_kv_heads, config.head_dim)
  rk, rv = rng.normal(size=shape), rng.normal(size=shape)
  rq = rng.normal(size=shape[:2] + (config.num_heads, config.head_dim))
  rand = attention_errors(rk.astype(np.float32), rv.astype(np.float32), rq.astype(np.float32),
                          lengths, dtypes)
  real.update(error_split(k[layers], v[layers], base.q[layers], lengths,
                          (jnp.int8, jnp.float8_e4m3fn)))
  layer_note = "every 3rd layer" if quick else "all layers"
  for name, errors in ((f"model K/V, q ({layer_note})", real), ("random N(0,1) K/V, q", rand)):
    for label, (worst, mean) in errors.items():
      rows += [Row("quant", f"attention vs float64, {name}: {label} max rel error", worst, "rel"),
               Row("quant", f"attention vs float64, {name}: {label} mean rel error", mean,
                   "rel")]
  return rows


def run(quick: bool = False) -> list[Row]:
  from jaxpaged.models import gguf  # pylint: disable=g-import-not-at-top
  repeats = 5 if quick else 15
  rows = _capacity_rows()
  rows += _attention_rows(8, 2048, repeats)
  rows += _attention_rows(1, 32768, repeats)
  config, params, tokenizer = gguf.load()
  params = jax.tree.map(jnp.asarray, params)
  rows += _serve_rows(params, config, tokenizer, quick)
  rows += _accuracy_rows(params, config, tokenizer, quick)
  return rows
