"""``METHODS``: the name of ``adapt.method`` -> its class. Explicit, so go-to-definition works."""

from __future__ import annotations

from components.adaptation.base import AdaptationMethod
from components.adaptation.baselines import DANN, MMD, SourceOnly
from components.adaptation.cdanet import CDANet
from components.adaptation.dacs import DACS
from components.adaptation.dida import DIDA
from components.adaptation.sda.method import SDA
from components.adaptation.t2s import T2S

METHODS: dict[str, type[AdaptationMethod]] = {
    "source_only": SourceOnly,
    "sda": SDA,
    "dacs": DACS,
    "mmd": MMD,
    "dann": DANN,
    "t2s": T2S,
    "dida": DIDA,
    "cdanet": CDANet,
}
