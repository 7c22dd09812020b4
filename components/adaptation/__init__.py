"""Adaptation methods, one module (or package) per method, chosen by ``adapt.method``.

Explicit registry, no string magic: go-to-definition works from here.
"""

from components.adaptation.sda.method import SDA

METHODS = {"sda": SDA}
