"""connic-weather: an example agent plugin for connic.

It shows the three things most agents need: reading ``turn.context``, rendering a
reply from a jinja2 template, and remembering things in ``turn.session.state``.
The weather is made up (a stable hash of the place name), so it works offline.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from importlib import resources

import attrs
import jinja2

import connic

__all__ = ["WeatherAgent", "made_up_weather"]

SKIES = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy")
_PIECES = re.compile(r"\S+\s*")


def _units(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in ("metric", "imperial"):
        raise ValueError(f"{attribute.name} must be 'metric' or 'imperial', got {value!r}")


def made_up_weather(place: str) -> tuple[str, int]:
    """A sky and a temperature in °C that are always the same for the same place."""
    digest = hashlib.sha256(place.strip().lower().encode()).digest()
    return SKIES[digest[0] % len(SKIES)], digest[1] % 40 - 5


class WeatherAgent(connic.Agent):
    """Reports (made-up) weather for context.location, remembering the last place."""

    @attrs.frozen
    class Options:
        """``units``: metric or imperial; ``delay``: seconds between chunks; ``template``: jinja2 text."""

        units: str = attrs.field(default="metric", validator=_units)
        delay: float = 0.0
        template: str | None = None

    options: Options

    def __init__(self, name: str, options: Options) -> None:
        super().__init__(name, options)
        environment = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        source = options.template
        if source is None:
            source = resources.files("connic_weather").joinpath("templates/report.j2").read_text("utf-8")
        try:
            self.template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise connic.ConfigError(f"template: {exc.message} (line {exc.lineno})") from None

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        """Render the report for the place in the context, or the last place asked about."""
        state = turn.session.state
        state["questions"] = state.get("questions", 0) + 1
        place = turn.context.get("location")
        follow_up = not place and "place" in state
        if not place:
            place = state.get("place", "your area")
        state["place"] = place
        units = turn.context.get("units", self.options.units)
        sky, celsius = made_up_weather(str(place))
        temperature, unit = (celsius, "°C") if units != "imperial" else (round(celsius * 9 / 5 + 32), "°F")
        text = self.template.render(
            place=place,
            sky=sky,
            temperature=temperature,
            unit=unit,
            questions=state["questions"],
            follow_up=follow_up,
            message=turn.message,
        )
        for piece in _PIECES.findall(text.strip()):
            if self.options.delay:
                await asyncio.sleep(self.options.delay)
            yield piece
        yield connic.Usage(prompt_tokens=len(turn.message.split()), candidates_tokens=len(text.split()))
