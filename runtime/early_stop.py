"""Early stopping of a search (``--early_stop``), before it collapses.

- ``skip:N`` (DARTS+, Liang et al. 2019): stop as soon as the derived normal cell
  holds N or more skip_connect, and keep that epoch's genotype, as DARTS+ does.
- ``hessian`` (RobustDARTS, Zela et al. 2020): with the dominant Hessian eigenvalue
  measured every ``--hessian_every`` epochs, stop when the mean magnitude of the last
  ``window`` measurements exceeds ``ratio`` times that of the ``window`` measurements
  before them, checking only at epochs after ``after``; keep the genotype of the
  epoch that ends the earlier window (the start of the window that grew).  The
  paper's values: window 5, after epoch 10, growth 1/0.75 (about 1.3).

The rules read the per-epoch summaries the search keeps in its checkpoint
(``{"epoch", "genotype", "eigenvalue"}``, eigenvalue None when not measured), so a
resumed search decides as an uninterrupted one.
"""
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence

from runtime.errors import UserError

Summary = Dict[str, Any]


@dataclass(frozen=True)
class Stop:
    """Why a search stopped after ``epoch``, and whose genotype it keeps."""
    epoch: int
    kept_epoch: int
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EarlyStop:
    """A parsed ``--early_stop`` rule with its parameters."""
    rule: str  # "skip" or "hessian"
    skips: int = 0
    window: int = 5
    after: int = 10
    ratio: float = 1.3

    @classmethod
    def parse(cls, text: str, window: int, after: int, ratio: float) -> "EarlyStop":
        """``skip:N`` or ``hessian``; a ``UserError`` names what is wrong."""
        if text == "hessian":
            if window < 1 or after < 0 or not ratio > 0:
                raise UserError(f"--early_stop hessian needs --early_stop_window >= 1, "
                                f"--early_stop_after >= 0 and --early_stop_ratio > 0, got "
                                f"{window}, {after} and {ratio}")
            return cls("hessian", window=window, after=after, ratio=ratio)
        rule, _, count = text.partition(":")
        if rule == "skip" and count.isdigit():
            return cls("skip", skips=int(count))
        raise UserError(f"--early_stop: expected skip:N (N a whole number, e.g. skip:2) or "
                        f"hessian, got {text!r}")

    def check(self, summaries: Sequence[Summary]) -> Optional[Stop]:
        """Whether to stop after the last epoch of ``summaries`` (in epoch order)."""
        return self._skip(summaries[-1]) if self.rule == "skip" else self._hessian(summaries)

    def _skip(self, last: Summary) -> Optional[Stop]:
        skips = sum(op == "skip_connect" for op, *_ in last["genotype"]["normal"])
        if skips < self.skips:
            return None
        epoch = last["epoch"]
        return Stop(epoch, epoch, f"the normal cell of epoch {epoch} holds {skips} skip_connect "
                                  f"(--early_stop skip:{self.skips}); keeping its genotype")

    def _hessian(self, summaries: Sequence[Summary]) -> Optional[Stop]:
        measured = [s for s in summaries if s["eigenvalue"] is not None]
        w = self.window
        last = summaries[-1]
        if (last["eigenvalue"] is None or last["epoch"] <= self.after
                or len(measured) < 2 * w):
            return None
        recent, earlier = measured[-w:], measured[-2 * w:-w]
        now, before = (sum(abs(s["eigenvalue"]) for s in part) / w for part in (recent, earlier))
        if not now > self.ratio * before:
            return None
        kept = earlier[-1]["epoch"]
        growth = f"{now / before:.3g}x" if before > 0 else "up from 0"
        return Stop(last["epoch"], kept,
                    f"the dominant Hessian eigenvalue's mean magnitude grew {growth} "
                    f"(> --early_stop_ratio {self.ratio}), from {before:.4g} over epochs "
                    f"{earlier[0]['epoch']}-{kept} to {now:.4g} over epochs "
                    f"{recent[0]['epoch']}-{last['epoch']}; keeping the genotype of epoch {kept}")
