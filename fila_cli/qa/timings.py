"""Seconds per stage of one answer, as the record's "timings" holds them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Records round seconds to this many digits: a tenth of a millisecond says all a person reads.
TIMING_DIGITS = 4


@dataclass
class Timings:
    """Where one answer's time went. The vision stages add to it as pages are prepared, the LLM's
    stages as the answer is decoded; a chat charges the pages' cost to the turn after they load."""

    render_s: float = 0.0
    encode_s: float = 0.0
    prefill_s: float = 0.0
    generate_s: float = 0.0

    def add_llm(self, prefill_s: float, generate_s: float) -> None:
        self.prefill_s += prefill_s
        self.generate_s += generate_s

    def add(self, other: Timings) -> None:
        for name, seconds in asdict(other).items():
            setattr(self, name, getattr(self, name) + seconds)

    def to_json(self) -> dict[str, float]:
        return {name: round(seconds, TIMING_DIGITS) for name, seconds in asdict(self).items()}
