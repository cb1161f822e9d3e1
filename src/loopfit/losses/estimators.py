"""Estimators of the teacher's next-token distribution from a sparse record: one `Estimator` definition each.

An estimator is everything about one way of storing the teacher in the offline cache, in one place: its settings
checks, what the cache writer keeps of the teacher's logits (`encode`: a record of ids and values per position,
plus a tail mass for `topk_tail`), how training reads a record back as targets over a support (`teacher_logprobs`,
and the student's side over the same support, `student_logprobs`), how inspection rebuilds a dense distribution
(`dense`), and the estimator's bias (`bias`).

The student always keeps its full-vocabulary normaliser; the comparison runs over the support (the stored ids, plus
the tail bucket of `topk_tail`) with the student's full-vocabulary probabilities there. For `topk` and `sampled`
the student's mass outside the support appears only through that normaliser: forward KL stays >= 0 and has the
right gradient, while reverse-type kinds are approximations that can dip slightly below zero.
"""

from __future__ import annotations

import torch

from loopfit.losses.divergences import _LOG_FLOOR

_TAIL_NOISE = -13.815510557964274  # log(1e-6)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """`log(1 - exp(x))` for `x <= 0`, accurate on both sides of `-log 2` (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"); `x` clamped just below 0 so that a zero remainder gives a very negative finite value with a
    zero (not NaN) gradient."""
    x = x.clamp(max=-1e-30)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_from_logprobs(values: torch.Tensor) -> torch.Tensor:
    """Log of the teacher mass outside the k tokens, from their full-vocabulary log-probabilities `(..., k)`.

    `1 - sum(p_k)` is only as accurate as the rounding of the k values, so a remainder below 1e-6 is taken as
    zero (log-mass `-1e4`): otherwise rounding noise at k = V would become a visible tail once softened by T > 1.
    Whoever has the full distribution (the cache writer) should store the exact tail instead.
    """
    tail = log1mexp(torch.logsumexp(values.float(), dim=-1))
    return torch.where(tail < _TAIL_NOISE, _LOG_FLOOR, tail)


class Estimator:
    """One way to store the teacher's distribution sparsely and read it back as training targets.

    Class attributes:
        name: `--estimator` / `estimator=` value.
        bias: what the targets get wrong, in one sentence (`docs/concepts.md` has the table).
        counts: the values are draw counts (stored as unsigned integers), not float16 log-probabilities.
        has_tail: a record also holds the log of the teacher mass outside its ids, per position.
        tempered: the record was made at the cache's temperature, so training must use the same one; otherwise
            the values are log-probabilities at T = 1 and training applies its own temperature.
    """

    name: str = ""
    bias: str = ""
    counts: bool = False
    has_tail: bool = False
    tempered: bool = False

    def width(self, settings) -> int:
        """Most entries a position can hold under `settings` (a `CacheSettings`)."""
        raise NotImplementedError

    def check(self, settings, vocab_size: int) -> None:
        """Raise `ValueError` for a setting of this estimator out of range (the writer's flags; the cache writer
        reports it as a one-line `LoopfitError`)."""
        raise NotImplementedError

    def encode(self, logits: torch.Tensor, settings, generator: torch.Generator | None):
        """`(n, V)` teacher logits of the n positions to store -> `(entries per position (n,), ids (E,), values (E,),
        tail (n,) or None)`, the entries position-major."""
        raise NotImplementedError

    def teacher_logprobs(
        self, values: torch.Tensor, tail: torch.Tensor | None, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Targets at `temperature`: the teacher's log-probabilities over the support `(n, k)` and over the tail bucket
        `(n,)` (None without one), normalised together; entries absent from a record get about `-1e4`.

        Args:
            values: `(n, k)` float32 record values; tail: `(n,)` stored tail log-mass or None.
        """
        raise NotImplementedError

    def student_logprobs(
        self, logq_full: torch.Tensor, ids: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's log-probabilities over the same support `(n, k)` and tail bucket `(n,)` or None, from its
        full-vocabulary `logq_full (n, V)`."""
        return logq_full.gather(-1, ids), None

    def dense(self, ids: torch.Tensor, values: torch.Tensor, tail: torch.Tensor | None, has: torch.Tensor,
              vocab_size: int) -> torch.Tensor:  # fmt: skip
        """Reconstructed `(S, V)` float32 teacher probabilities of a row's records `(S, k)` (at T = 1, or the draw
        temperature), for inspection; rows where `has` `(S,)` is False are zero."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Estimator({self.name}: {self.bias})"


class TopK(Estimator):
    """The k most likely tokens and their log-probabilities; targets renormalised over those k."""

    name = "topk"
    bias = ("biased: head probabilities inflated by 1 / P(top-k) and every other token pushed towards zero (exact at "
            "k = V)")  # fmt: skip

    def width(self, settings) -> int:
        return settings.top_k

    def check(self, settings, vocab_size: int) -> None:
        if not 1 <= settings.top_k <= vocab_size:
            raise ValueError(f"--top_k must be in [1, vocabulary size {vocab_size}], got {settings.top_k}")

    def encode(self, logits, settings, generator):
        logp = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logp.topk(settings.top_k, dim=-1)
        entries = torch.full((logits.shape[0],), settings.top_k, dtype=torch.long)
        return entries, ids.reshape(-1), values.reshape(-1), self._tail(logp, ids)

    def _tail(self, logp, ids):
        return None

    def teacher_logprobs(self, values, tail, temperature):
        return torch.log_softmax(values / temperature, dim=-1), None

    def dense(self, ids, values, tail, has, vocab_size):
        p = values.double().exp() * has[:, None]
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-300)
        return torch.zeros(ids.shape[0], vocab_size, dtype=torch.float64).scatter_(-1, ids, p).float()


class TopKTail(TopK):
    """The k most likely tokens plus one bucket holding the teacher's remaining mass; the student's mass outside the
    k tokens is aggregated into its own bucket."""

    name = "topk_tail"
    bias = ("biased inside the tail (the bucket hides its shape, and at T != 1 it is softened as if it were one "
            "token) but keeps the right head/tail split; exact at k = V")  # fmt: skip
    has_tail = True

    def _tail(self, logp, ids):
        # Exact remaining mass (a logsumexp over the other tokens), -inf when k = V; not 1 - sum(p_k).
        return logp.scatter(-1, ids, -torch.inf).logsumexp(-1)

    def teacher_logprobs(self, values, tail, temperature):
        tail = tail_from_logprobs(values) if tail is None else tail.float()
        logp = torch.log_softmax(torch.cat([values, tail.unsqueeze(-1)], dim=-1) / temperature, dim=-1)
        return logp[..., :-1], logp[..., -1]

    def student_logprobs(self, logq_full, ids, values):
        # The student's tail as a sum over the other tokens, not 1 - sum(q_k), which is rounding noise at k = V.
        # Filling the k ids with a finite floor keeps an empty tail's gradient finite.
        return logq_full.gather(-1, ids), logq_full.scatter(-1, ids, _LOG_FLOOR).logsumexp(-1)

    def dense(self, ids, values, tail, has, vocab_size):
        # The tail mass spread evenly over the tokens outside the k.
        others = vocab_size - ids.shape[-1]
        spread = tail.double().exp() / max(others, 1) if others else torch.zeros(ids.shape[0], dtype=torch.float64)
        probs = (spread * has).unsqueeze(-1).expand(ids.shape[0], vocab_size).clone()
        return probs.scatter_(-1, ids, values.double().exp() * has[:, None]).float()


class Sampled(Estimator):
    """Ids drawn from the teacher's distribution with their counts (random-sampling KD, arXiv:2503.16870)."""

    name = "sampled"
    bias = (
        "unbiased: counts / draws estimates the teacher distribution at the draw temperature, so the forward-KL "
        "gradient is unbiased; the other kinds are non-linear in the teacher probabilities and stay biased"
    )
    counts = True
    tempered = True

    def width(self, settings) -> int:
        return settings.samples

    def check(self, settings, vocab_size: int) -> None:
        if not 1 <= settings.samples <= 65535:
            raise ValueError(f"--samples must be in [1, 65535], got {settings.samples}")

    def encode(self, logits, settings, generator):
        logp = torch.log_softmax(logits.float() / settings.temperature, dim=-1)
        draws = torch.multinomial(logp.exp(), settings.samples, replacement=True, generator=generator)
        hist = torch.zeros(logp.shape, dtype=torch.int32).scatter_add_(
            -1, draws, torch.ones_like(draws, dtype=torch.int32)
        )
        where = hist.nonzero()  # (position, id) pairs, position-major then by id: already CSR order
        return (hist > 0).sum(-1), where[:, 1], hist[where[:, 0], where[:, 1]], None

    def teacher_logprobs(self, values, tail, temperature):
        # Positions padded with count 0 are outside the support.
        logp = torch.where(values > 0, values.clamp(min=1e-30).log(), _LOG_FLOOR)
        return logp - torch.logsumexp(logp, dim=-1, keepdim=True), None

    def student_logprobs(self, logq_full, ids, values):
        # Padding entries (count 0) are outside the support for both sides.
        return torch.where(values > 0, logq_full.gather(-1, ids), _LOG_FLOOR), None

    def dense(self, ids, values, tail, has, vocab_size):
        probs = torch.zeros(ids.shape[0], vocab_size, dtype=torch.float64).scatter_add_(-1, ids, values.double())
        return (probs / probs.sum(-1, keepdim=True).clamp(min=1)).float()


ESTIMATOR_REGISTRY: dict[str, Estimator] = {e.name: e for e in (TopK(), TopKTail(), Sampled())}
ESTIMATORS = tuple(ESTIMATOR_REGISTRY)


def get_estimator(estimator: str | Estimator) -> Estimator:
    """The definition of `estimator` (a registered name, or an `Estimator` passed through). ValueError if unknown."""
    if isinstance(estimator, Estimator):
        return estimator
    if estimator not in ESTIMATOR_REGISTRY:
        raise ValueError(f"unknown sparse estimator '{estimator}'; choose one of {', '.join(ESTIMATORS)}")
    return ESTIMATOR_REGISTRY[estimator]
