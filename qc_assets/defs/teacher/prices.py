"""What teacher tokens cost: a small price table in USD per million tokens, and how a setting picks an entry.

Each entry names where its figures come from and when they were checked; prices change, so check the source
before a paid run. A model without an entry (a local vLLM or SGLang server) is free unless QC_TEACHER_PRICE says
otherwise, and cannot run under a spend cap: the cap would never stop it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

DEEPSEEK_PRICING_PAGE = "https://api-docs.deepseek.com/quick_start/pricing"


@dataclass(frozen=True)
class UtcWindow:
    """A daily window in UTC, from `start` (inclusive) to `end` (exclusive); it may wrap midnight (16:30-00:30)."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> UtcWindow:
        match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
        if match is None:
            raise ValueError(f"{text!r} is not a UTC window like 16:30-00:30")
        hours_start, minutes_start, hours_end, minutes_end = map(int, match.groups())
        try:
            window = cls(time(hours_start, minutes_start), time(hours_end, minutes_end))
        except ValueError:
            raise ValueError(f"{text!r}: hours go from 0 to 23 and minutes from 0 to 59") from None
        if window.start == window.end:
            raise ValueError(f"{text!r} is empty: it starts when it ends")
        return window

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} UTC"

    def occurrence(self, moment: datetime) -> tuple[datetime, datetime] | None:
        """When the window `moment` falls in opened and when it closes, or None when it falls outside."""
        utc = moment.astimezone(UTC)
        for day in (utc.date() - timedelta(days=1), utc.date()):
            opens = datetime.combine(day, self.start, tzinfo=UTC)
            closes_on = day if self.end > self.start else day + timedelta(days=1)
            closes = datetime.combine(closes_on, self.end, tzinfo=UTC)
            if opens <= utc < closes:
                return opens, closes
        return None

    def contains(self, moment: datetime) -> bool:
        return self.occurrence(moment) is not None


@dataclass(frozen=True)
class Rates:
    """USD per million tokens; cached input at the input rate unless the provider discounts it."""

    input_per_m: float
    output_per_m: float
    cached_input_per_m: float | None = None

    def cost_usd(self, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> float:
        """Reasoning tokens are billed as output: they are part of the completion count."""
        cached_rate = self.input_per_m if self.cached_input_per_m is None else self.cached_input_per_m
        uncached = max(0, input_tokens - cached_input_tokens)
        return (
            uncached * self.input_per_m + cached_input_tokens * cached_rate + output_tokens * self.output_per_m
        ) / 1e6


@dataclass(frozen=True)
class OffPeak:
    """A provider's daily discount: requests made inside `window` are billed at `rates`."""

    window: UtcWindow
    rates: Rates


@dataclass(frozen=True)
class Price:
    name: str
    rates: Rates
    off_peak: OffPeak | None = None
    source: str = ""
    checked: str = ""

    def cost_usd(self, input_tokens: int, cached_input_tokens: int, output_tokens: int, at: datetime) -> float:
        """What a request made at `at` costs."""
        rates = self.rates
        if self.off_peak is not None and self.off_peak.window.contains(at):
            rates = self.off_peak.rates
        return rates.cost_usd(input_tokens, cached_input_tokens, output_tokens)


# DeepSeek-R1 as `deepseek-reasoner` on DeepSeek's API, whose name was retired on 2026-07-24: seed 000 labelled its
# 100k documents inside the 16:30-00:30 UTC discount window. Kept to price seed 000's run and its labels.
R1_NIGHT = OffPeak(UtcWindow(time(16, 30), time(0, 30)), Rates(0.135, 0.55, cached_input_per_m=0.035))
R1_SOURCE = f"{DEEPSEEK_PRICING_PAGE} (historical: `deepseek-reasoner` was retired on 2026-07-24)"

PRICES: dict[str, Price] = {
    price.name: price
    for price in (
        Price(
            "deepseek-v4-flash",
            Rates(0.14, 0.28, cached_input_per_m=0.0028),
            source=f"{DEEPSEEK_PRICING_PAGE}; DeepSeek API changelog of 2026-04-24",
            checked="2026-12",
        ),
        Price(
            "deepseek-reasoner",
            Rates(0.55, 2.19, cached_input_per_m=0.14),
            off_peak=R1_NIGHT,
            source=R1_SOURCE,
            checked="seed 000's run",
        ),
        Price("deepseek-reasoner-night", R1_NIGHT.rates, source=R1_SOURCE, checked="seed 000's run"),
        Price("free", Rates(0.0, 0.0)),
    )
}
# Only models served under these names today; deepseek-v4-pro has no entry: its published figures disagree.
DEFAULT_PRICE_BY_MODEL = {"deepseek-v4-flash": "deepseek-v4-flash"}


class PriceError(ValueError):
    pass


def resolve_price(setting: str | None, model: str, capped: bool) -> Price:
    """`setting` is a table entry, `input=…,output=…[,cached=…]`, or None for the model's entry. A model without
    one is free, except under a spend cap (`capped`), where that would mean no cap at all."""
    if setting is None:
        if model in DEFAULT_PRICE_BY_MODEL:
            return PRICES[DEFAULT_PRICE_BY_MODEL[model]]
        if capped:
            raise PriceError(
                f"the spend cap cannot work: QC_TEACHER_MODEL={model!r} has no entry in the price table "
                f"({', '.join(PRICES)}); set QC_TEACHER_PRICE to one of them or to input=<usd>,output=<usd> "
                "per million tokens"
            )
        return PRICES["free"]
    if setting in PRICES:
        return PRICES[setting]
    return _custom_price(setting)


def _custom_price(setting: str) -> Price:
    if "=" not in setting:
        raise PriceError(f"QC_TEACHER_PRICE: {setting!r} is not one of {', '.join(PRICES)} nor input=…,output=…")
    fields: dict[str, float] = {}
    for part in setting.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in ("input", "output", "cached"):
            raise PriceError(f"QC_TEACHER_PRICE: unknown field {key!r}; use input, output and cached")
        try:
            fields[key] = float(value)
        except ValueError:
            raise PriceError(f"QC_TEACHER_PRICE: {key}={value!r} is not a number of USD per million tokens") from None
        if fields[key] < 0:
            raise PriceError(f"QC_TEACHER_PRICE: {key} must not be negative")
    if "input" not in fields or "output" not in fields:
        raise PriceError("QC_TEACHER_PRICE: give both input= and output= (USD per million tokens)")
    return Price("custom", Rates(fields["input"], fields["output"], fields.get("cached")), source="QC_TEACHER_PRICE")


def off_peak_window(setting: str | None, model: str) -> UtcWindow | None:
    """The off-peak window of the entry `setting` (or the model's default) names, if it has one."""
    name = setting if setting is not None else DEFAULT_PRICE_BY_MODEL.get(model)
    entry = PRICES.get(name) if name is not None else None
    return entry.off_peak.window if entry is not None and entry.off_peak is not None else None
