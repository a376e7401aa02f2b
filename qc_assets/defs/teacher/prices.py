"""What teacher tokens cost: a small price table in USD per million tokens, and how a setting picks an entry."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    name: str
    input_per_m: float
    output_per_m: float
    cached_input_per_m: float | None = None

    def cost_usd(self, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> float:
        """Reasoning tokens are billed as output: they are part of the completion count."""
        cached_rate = self.input_per_m if self.cached_input_per_m is None else self.cached_input_per_m
        uncached = max(0, input_tokens - cached_input_tokens)
        return (uncached * self.input_per_m + cached_input_tokens * cached_rate + output_tokens * self.output_per_m) / 1e6


PRICES: dict[str, Price] = {
    price.name: price
    for price in (
        # Seed 000 labelled 100k documents inside DeepSeek's 16:30-00:30 UTC discount window at these prices.
        Price("deepseek-reasoner-night", input_per_m=0.135, output_per_m=0.55, cached_input_per_m=0.035),
        Price("deepseek-reasoner", input_per_m=0.55, output_per_m=2.19, cached_input_per_m=0.14),
        Price("free", input_per_m=0.0, output_per_m=0.0),
    )
}
DEFAULT_PRICE_BY_MODEL = {"deepseek-reasoner": "deepseek-reasoner-night"}


class PriceError(ValueError):
    pass


def resolve_price(setting: str | None, model: str) -> Price:
    """`setting` is a table entry, `input=…,output=…[,cached=…]`, or None for the model's default (else free)."""
    if setting is None:
        return PRICES[DEFAULT_PRICE_BY_MODEL.get(model, "free")]
    if setting in PRICES:
        return PRICES[setting]
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
    return Price("custom", fields["input"], fields["output"], fields.get("cached"))
