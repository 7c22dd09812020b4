"""``METHODS``: the name of ``adapt.method`` -> its class. Explicit, so go-to-definition works."""

from __future__ import annotations

from components.adaptation.base import AdaptationMethod
from components.adaptation.sda.method import SDA

METHODS: dict[str, type[AdaptationMethod]] = {
    "sda": SDA,
}
