"""Each adaptation method's own params section, ``adapt.<method>`` in ``params.yaml``.

One frozen class per method (``METHOD_CONFIGS`` maps the name of ``adapt.method`` to it). A
method's cross-field rules are declared here once, as ``ORDERED``: pairs ``(low, high)`` of
fields that must satisfy ``low < high``. Validation, the sweep space (``pipelines.sweep_space``)
and the best-params overlay all read them from here. "paper" = the method's paper, "assumed" =
our choice for the CPU-sized benchmark (the paper leaves it open or its value was lost).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from components.config_types import Fraction, PositiveInt, Section

Positive = Annotated[float, Field(gt=0)]
NonNeg = Annotated[float, Field(ge=0)]
Momentum = Annotated[float, Field(ge=0, lt=1)]


class MethodSection(Section):
    """Base of every method section."""

    #: (low, high) field pairs that must satisfy ``low < high``
    ORDERED: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: the tasks (``data.task``) the method runs on
    TASKS: ClassVar[tuple[str, ...]] = ("referring", "semantic")

    @model_validator(mode="after")
    def _ordered(self):
        for low, high in self.ORDERED:
            a, b = getattr(self, low), getattr(self, high)
            if a >= b:
                raise ValueError(f"{low} ({a}) must be < {high} ({b})")
        return self


class SourceOnlyConfig(MethodSection):
    """No adaptation: the same schedule on the labeled source only (the floor)."""


class SDAConfig(MethodSection):
    """SDA stage 3, Dual Adaptive Branches (Section 3.3, Appendix C.2)."""

    ORDERED = (("gamma_min", "gamma_max"),)
    TASKS = ("referring",)  # its categories come from the queries' words

    gamma_max: Fraction = Field(0.9, description="paper")
    gamma_min: Fraction = Field(0.1, description="paper")
    memory_size: PositiveInt = Field(100, description="B per category (paper).")
    ema: Momentum = Field(0.99, description="Teacher momentum (paper).")
    contrast_temperature: Positive = Field(0.1, description="assumed")
    lambda1: NonNeg = Field(1.0, description="paper")
    lambda2: NonNeg = Field(0.1, description="paper")
    pixels: PositiveInt = Field(256, description="Pixels sampled per batch for contrast.")
    dropped_masks: Literal["background", "ignore"] = Field(
        "background",
        description="Target samples whose semantic mask is empty (the masks stage dropped "
        "it, or the query names nothing): L_aux trains them towards background, or leaves "
        "them out.",
    )
    anchors: Literal["majority", "majority_or_peak"] = Field(
        "majority",
        description="CFB's foreground anchor cells at the feature resolution: more than half "
        "covered by the mask, or also a mask's best-covered cell when it has no such cell.",
    )
    cfb: bool = Field(True, description="Contrastive Feature Branch on.")
    contrastive: bool = Field(True, description="off = w/o contrastive (plain similarity).")
    memory: bool = Field(True, description="off = w/o memory bank.")
    rrb: bool = Field(True, description="Reciprocal Relation Branch on.")
    ct: bool = Field(True, description="off = w/o L_ct (no auxiliary target decoder).")
    ho: bool = Field(True, description="off = w/o L_ho.")
    reciprocal_masks: bool = Field(
        True, description="off = domain-based target masks only (teacher pseudo masks)."
    )


class AlignConfig(MethodSection):
    """What MMD and DANN align (SDA Appendix C.3: pixel-level visual features, and query
    features on the referring task)."""

    weight: NonNeg = Field(0.1, description="Weight of the alignment loss (assumed).")
    pixels: PositiveInt = Field(256, description="Pixels sampled per domain and step.")
    query: bool = Field(True, description="Also align sentence features (referring task).")


class MMDConfig(AlignConfig):
    """Multi-kernel MMD (Long et al., 2015) between source and target features."""

    bandwidths: list[Positive] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0],
        description="Gaussian kernel widths, multiples of the median distance (assumed).",
    )


class DANNConfig(AlignConfig):
    """Domain classifier behind a gradient-reversal layer (Ganin and Lempitsky, 2015)."""

    hidden: PositiveInt = Field(64, description="Domain classifier width (assumed).")


class TeacherConfig(MethodSection):
    """Mean-teacher self-training shared by DACS, T2S-DA and DIDA."""

    ema: Momentum = Field(0.99, description="Teacher EMA (DAFormer: 0.999; short run: 0.99).")
    threshold: Fraction = Field(
        0.968, description="Pseudo-label confidence threshold of the quality weight (DACS)."
    )
    target_weight: NonNeg = Field(1.0, description="Weight of the target loss (paper: 1).")


class DACSConfig(TeacherConfig):
    """DACS: ClassMix of source into target with the teacher's pseudo-labels."""

    mix: bool = Field(True, description="ClassMix on; off = plain mean-teacher self-training.")


class T2SConfig(TeacherConfig):
    """T2S-DA: pull pseudo-target (FDA) features to source prototypes."""

    fda_band: Annotated[float, Field(gt=0, le=0.5)] = Field(
        0.05, description="FDA low-frequency band as a share of the image side (assumed)."
    )
    objective: Literal["infonce", "mse"] = Field("infonce", description="paper: InfoNCE")
    temperature: Positive = Field(0.2, description="InfoNCE temperature (assumed).")
    weight: NonNeg = Field(1.0, description="Weight of the pulling loss (assumed).")
    unreliable: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.2, description="Share of least confident target pixels used as negatives (assumed)."
    )
    queries: PositiveInt = Field(256, description="Base number of queries per step (assumed).")
    negatives: PositiveInt = Field(256, description="Negative keys per query (assumed).")
    reweight: bool = Field(True, description="Dynamic re-weighting by target confidence.")
    mix: bool = Field(True, description="ClassMix self-training base (DACS), as the paper.")
    pseudo_ce: bool = Field(False, description="Also CE on pseudo-target images (Tab. 7: off).")


class DIDAConfig(TeacherConfig):
    """DIDA: a labeled instance bank, instance-level predictions and label regeneration."""

    bank_size: PositiveInt = Field(
        300, description="K features in all, K // C slots per class (paper: 300)."
    )
    bank_interval: PositiveInt = Field(
        5, description="u: bank update every u steps (assumed; paper 50 over 40k iterations)."
    )
    bank_momentum: Momentum = Field(
        0.99, description="EMA of a bank entry (assumed; paper 0.999 over 40k iterations)."
    )
    sigma: PositiveInt = Field(
        1, description="Boundary: more than sigma classes in 3x3 (assumed; paper 2)."
    )
    temperature: Positive = Field(0.1, description="t of the cosine similarity (paper).")
    phi: Fraction = Field(0.9, description="Scattering / gathering threshold (paper).")
    lambda_ins: NonNeg = Field(1.0, description="Weight of the instance-level loss (paper: 1).")
    regenerate: bool = Field(True, description="Scattering / gathering regeneration on.")
    strength: Fraction = Field(0.5, description="Strong view: jitter / noise amount (assumed).")


class CDANetConfig(MethodSection):
    """CDANet: cross-domain spatial (CD-SAM) and channel (CD-CAM) attention, segmentation
    losses on every attended feature and three output-space discriminators."""

    lambda_s: NonNeg = Field(
        1.0, description="Eq. 2: weight of the target context in A'_s (paper)."
    )
    lambda_t: NonNeg = Field(
        1.0, description="Eq. 4: weight of the source context in A'_t (paper)."
    )
    xi_s: NonNeg = Field(1.0, description="Eq. 6: weight of the target context in B'_s (paper).")
    xi_t: NonNeg = Field(1.0, description="Eq. 8: weight of the source context in B'_t (paper).")
    key_reduction: PositiveInt = Field(
        8, description="Q and K of CD-SAM have C // key_reduction channels (paper: 256 of 2048)."
    )
    threshold: Fraction = Field(
        0.9, description="Confidence a target pixel needs to get a pseudo-label (BDL's 0.9)."
    )
    fda_band: Annotated[float, Field(gt=0, le=0.5)] = Field(
        0.05, description="FDA restyling of the source (paper: CycleGAN) as in T2S (assumed)."
    )
    lambda_adv: NonNeg = Field(
        1e-3,
        description="Eq. 13's lambda, on the reversed gradient only (assumed: AdaptSegNet's).",
    )
    disc_width: PositiveInt = Field(
        64, description="Discriminator channels: width x (1, 2, 4, 8), then 1 (paper: 64)."
    )
    chunk: PositiveInt = Field(
        1024, description="Source positions per chunk of the spatial energy map (assumed)."
    )


METHOD_CONFIGS: dict[str, type[MethodSection]] = {
    "source_only": SourceOnlyConfig,
    "sda": SDAConfig,
    "dacs": DACSConfig,
    "mmd": MMDConfig,
    "dann": DANNConfig,
    "t2s": T2SConfig,
    "dida": DIDAConfig,
    "cdanet": CDANetConfig,
}
