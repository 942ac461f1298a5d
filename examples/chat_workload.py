"""The chat workload of the serving example, benchmark and tests: chat requests to a bakery's
assistant that share a long system prompt, arrive over time, and sometimes ask a second question
that extends their first turn (`jaxpaged.models.serving.Request` with ``follows``).

Import it as ``chat_workload`` from a script in this directory, or as ``examples.chat_workload``
from the repository root (benchmarks, tests).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import jaxpaged as jp
from jaxpaged.models.serving import Request

SYSTEM_PROMPT = (
    "You are Juniper, the customer assistant of Crumbs & Co., a family bakery with three shops "
    "in Lyon. Our shops open from 7am to 7pm, Tuesday to Sunday, and are closed on Mondays. We "
    "bake sourdough, baguettes, rye and spelt loaves every morning, croissants and pains au "
    "chocolat until noon, and fruit tarts, eclairs and a chocolate layer cake every afternoon. "
    "Gluten-free bread is baked on Thursdays only; vegan pastries are marked with a green leaf. "
    "Orders for cakes need two days' notice and can be picked up at any shop. We deliver within "
    "the city for orders above 30 euros. Loyalty card holders get every tenth coffee free. "
    "Answer in two or three friendly sentences, do not invent prices, and suggest calling the "
    "shop at 04 72 00 00 00 for anything you cannot answer.")

QUESTIONS = (
    "Are you open on Monday?", "Do you have gluten-free bread today?",
    "Can I order a birthday cake for tomorrow?", "What pastries do you bake in the morning?",
    "Do you deliver to Villeurbanne?", "Is the chocolate cake vegan?",
    "How does the loyalty card work?", "What time do you close on Sunday?",
    "Which bread would you recommend for a cheese platter?", "Do you sell coffee?",
    "Can I pick up my order at a different shop?", "When are the croissants fresh?",
    "Do you have anything without eggs?", "How many shops do you have?",
    "I would like twenty eclairs for Saturday, is that possible?", "What is spelt bread?",
)
FOLLOW_UPS = ("Thank you! Could you say that in one sentence?", "And what about on weekends?",
              "Great, how do I place the order?", "Can you recommend something sweet too?")


def _count(name: str, value: Any, fix: str = "") -> int:
  """``value`` as an int, if it is an int >= 1 (NumPy ints too, bools not)."""
  fix = f"; {fix}" if fix else ""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise jp.JaxPagedError(f"{name} must be an int >= 1, got {value!r} "
                           f"({type(value).__name__}){fix}.")
  if value < 1:
    raise jp.JaxPagedError(f"{name} must be an int >= 1, got {value}{fix}.")
  return int(value)


def _gap(value: Any) -> float:
  """``value`` as a float, if it is a finite number >= 0 (a time, as `Request.arrival`)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, float, np.integer, np.floating)) or not (np.isfinite(value) and value >= 0):
    raise jp.JaxPagedError(f"mean_gap must be a finite number >= 0 (seconds, or steps under the "
                           f"step clock), got {value!r}.")
  return float(value)


def chat_workload(tokenizer: Any, *, num_requests: int = 16, max_new_tokens: int = 32,
                  follow_up_every: int = 4, mean_gap: float = 0.5, seed: int = 0,
                  system: str = SYSTEM_PROMPT) -> list[Request]:
  """Chat requests sharing a long system prompt, arriving with exponential gaps of ``mean_gap``
  (seconds, or steps under the step clock); every ``follow_up_every``-th request gets a second
  turn (a follow-up question asked ``mean_gap`` after its answer), which extends the first turn's
  prompt and answer. Returns first turns then follow-ups (``follows`` points back).

  Args:
    tokenizer: a `jaxpaged.models.gguf.ChatTokenizer` (``gguf.load()``'s third value).

  Raises:
    JaxPagedError: a count that is not an int >= 1, or a gap that is not a finite number >= 0.
  """
  num_requests = _count("num_requests", num_requests)
  max_new_tokens = _count("max_new_tokens", max_new_tokens)
  follow_up_every = _count("follow_up_every", follow_up_every,
                           fix="e.g. 4: every fourth request gets a second turn")
  mean_gap = _gap(mean_gap)
  rng = np.random.default_rng(seed)
  arrivals = np.cumsum(rng.exponential(mean_gap, num_requests)) - mean_gap
  requests = [Request(tokenizer.encode(tokenizer.chat_prompt(QUESTIONS[i % len(QUESTIONS)],
                                                             system)),
                      max_new_tokens, float(max(arrivals[i], 0.0)))
              for i in range(num_requests)]
  # A follow-up turn's own tokens: what the chat template puts after the answer's end token.
  answer, eos = "ANSWER", tokenizer.tokenizer.id_to_token(tokenizer.eos_token_id)
  for n, i in enumerate(range(0, num_requests, follow_up_every)):
    text = tokenizer.render([{"role": "system", "content": system},
                             {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                             {"role": "assistant", "content": answer},
                             {"role": "user", "content": FOLLOW_UPS[n % len(FOLLOW_UPS)]}])
    turn = text.split(answer + eos, 1)[1]
    requests.append(Request(tokenizer.encode(turn), max_new_tokens, mean_gap, follows=i))
  return requests
