"""Typed, validated params: the one place where ``params.yaml`` becomes objects.

Every section of ``params.yaml`` maps to one frozen pydantic model. Unknown keys are refused,
ranges are checked, and cross-field rules (``gamma_min < gamma_max``) are enforced here, before
any stage does work. Errors name the offending field as a dotted path (``adapt.gamma_min``).
Values marked "paper" come from the SDA paper (Appendix C.2); "assumed" are our choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from components.adaptation.configs import (
    METHOD_CONFIGS,
    CDANetConfig,
    DACSConfig,
    DANNConfig,
    DIDAConfig,
    MethodSection,
    MMDConfig,
    SDAConfig,
    SourceOnlyConfig,
    T2SConfig,
)
from components.config_types import Fraction, NonNegInt, PositiveInt
from components.config_types import Section as _Section


class ParamsError(ValueError):
    """Raised when params.yaml is missing, malformed or out of range; names every bad field."""


class RuntimeConfig(_Section):
    """Where the work runs and where it is recorded. Not a DVC dependency: never changes results."""

    ray_address: str | None = Field(None, description="Ray cluster address; RAY_ADDRESS wins.")
    num_cpus: PositiveInt | None = Field(None, description="CPUs for a local Ray instance.")
    object_store_memory_mb: Annotated[int, Field(ge=78)] = Field(
        256, description="Object store size of a local Ray instance (MiB)."
    )
    object_spilling_dir: str | None = Field(
        None,
        description="Where a local Ray instance spills objects that do not fit in its store "
        "(null = Ray's temp dir, /tmp/ray).",
    )
    storage_path: str = Field(
        ".adaseg/ray_results",
        description="Ray Train/Tune storage (checkpoints, resume state); local path or URI.",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow store; MLFLOW_TRACKING_URI wins; null = sqlite:///mlruns.db."
    )
    mlflow_experiment: str = Field("adaseg", min_length=1)
    train_cpus: PositiveInt | None = Field(
        None, description="CPUs one training run takes (null = all the cluster's)."
    )
    data_in_memory: Literal["decoded", "encoded"] = Field(
        "decoded",
        description="How a stage holds a split: decoded arrays (fast; memory grows with the "
        "dataset's decoded size), or the samples as stored, decoded per batch (memory: the "
        "encoded split plus a batch; for datasets on disk).",
    )
    max_failures: Annotated[int, Field(ge=-1)] = Field(
        0,
        description="Restarts of a training phase's workers after a failure (a lost node), "
        "each from the last checkpoint; -1 = unlimited.",
    )


class GapConfig(_Section):
    """Strength of each kind of domain gap of SDA (0 = none, 1 = strongest)."""

    content_shift: Fraction = Field(0.6, description="Category / colour frequencies differ.")
    visual_gap: Fraction = Field(0.6, description="Texture, lighting, blur and noise on target.")
    language_gap: Fraction = Field(0.5, description="Synonyms and other templates on target.")
    relation_bias: Fraction = Field(0.6, description="Which attributes queries mention differs.")


class QueryMix(_Section):
    """Proportions of one-to-one, one-to-many and one-to-zero queries (must sum to 1)."""

    one: Fraction = 0.7
    many: Fraction = 0.2
    zero: Fraction = 0.1

    @model_validator(mode="after")
    def _sums_to_one(self) -> QueryMix:
        total = self.one + self.many + self.zero
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"one + many + zero must be 1, got {total:.4f}")
        return self


class SplitSizes(_Section):
    source_train: PositiveInt = 2000
    source_val: PositiveInt = 300
    target_train: PositiveInt = 2000
    target_val: PositiveInt = 300
    target_test: PositiveInt = 500


REFERRING_DATASETS = ("refcoco", "refcoco+", "refcocog", "refzom", "a2d", "jhmdb")
VIDEO_DATASETS = ("a2d", "jhmdb")
SEMANTIC_DATASETS = ("gta5", "synthia", "cityscapes")


class DataConfig(_Section):
    """The embedded cross-domain benchmark (``prepare`` stage) and the task trained on it."""

    task: Literal["referring", "semantic"] = Field(
        "referring",
        description="referring: image + query -> mask; semantic: image -> C classes per pixel.",
    )
    image_size: Annotated[int, Field(ge=32, le=512)] = 64
    splits: SplitSizes = SplitSizes()
    min_objects: NonNegInt = 1
    max_objects: PositiveInt = 4
    query_mix: QueryMix = QueryMix()
    queries_per_image: Annotated[int, Field(ge=1, le=16)] = Field(
        4,
        description="Queries (sample rows) per generated image, each kind drawn from "
        "query_mix; 1 = one query per image (benchmark v3). The splits count queries.",
    )
    expressions_per_object: PositiveInt = Field(
        2,
        description="One-to-one queries of an image refer to the same object this many at a "
        "time (RefCOCO: about 3 expressions per object).",
    )
    gap: GapConfig = GapConfig()
    slic_segments: Annotated[int, Field(ge=4, le=255)] = Field(
        32, description="Target number of SLIC superpixels per image."
    )
    slic_compactness: Annotated[float, Field(gt=0)] = 10.0
    shard_size: PositiveInt = Field(500, description="Samples per Parquet shard.")
    dataset: Literal[("synthetic", *REFERRING_DATASETS, *SEMANTIC_DATASETS)] = Field(  # type: ignore[valid-type]
        "synthetic",
        description="The source domain's dataset: the embedded benchmark, or a dataset on disk "
        "under data.root: referring (components.data.refer) or semantic (components.data."
        "cityscapes).",
    )
    target_dataset: Literal[(*REFERRING_DATASETS, *SEMANTIC_DATASETS)] | None = Field(  # type: ignore[valid-type]
        None, description="The target domain's dataset on disk (null = data.dataset)."
    )
    root: str | None = Field(
        None,
        description="Folder of the datasets on disk: <root>/<dataset>/ in each release's layout.",
    )
    split_by: str | None = Field(None, description="Source split_by (null = dataset's usual).")
    target_split_by: str | None = Field(None, description="Target split_by (null = usual).")
    image_dir: str = Field(
        "images/mscoco/images/train2014",
        description="Images of the source dataset, relative to data.root (or absolute).",
    )
    target_image_dir: str | None = Field(None, description="Target images (null = image_dir).")
    embed_images: bool = Field(
        False,
        description="Copy each image's PNG into the shards; false keeps images on disk by path.",
    )
    clip_frames: NonNegInt = Field(
        8,
        description="Video datasets: paths of this many frames around an annotated one are "
        "stored for a clip encoder (SDA: 8; 0 = none).",
    )

    @model_validator(mode="after")
    def _objects_range(self) -> DataConfig:
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        return self

    @model_validator(mode="after")
    def _real_dataset(self) -> DataConfig:
        if self.dataset == "synthetic":
            if self.target_dataset is not None:
                raise ValueError("target_dataset needs a dataset on disk (data.dataset)")
            return self
        from components.data.refer import split_by_of

        if not self.root:
            raise ValueError(f"root: data.dataset {self.dataset} needs the folder it lies in")
        if self.dataset in SEMANTIC_DATASETS:
            return self._semantic_pair()
        if self.task != "referring":
            raise ValueError(f"task: {self.dataset} is a referring dataset (no semantic maps)")
        if self.target_domain in SEMANTIC_DATASETS:
            raise ValueError(
                f"target_dataset: {self.target_domain} is a semantic dataset; the source "
                f"{self.dataset} is a referring one"
            )
        for name, dataset, split_by in (
            ("split_by", self.dataset, self.split_by),
            ("target_split_by", self.target_domain, self.target_split_by),
        ):
            if dataset in VIDEO_DATASETS:
                if split_by is not None:
                    raise ValueError(f"{name}: {dataset} has no split_by (leave it null)")
                continue
            try:
                split_by_of(dataset, split_by)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        return self

    def _semantic_pair(self) -> DataConfig:
        if self.task != "semantic":
            raise ValueError(f"task: {self.dataset} is a semantic dataset (no queries): 'semantic'")
        if self.target_domain not in SEMANTIC_DATASETS:
            raise ValueError(
                f"target_dataset: {self.target_domain} is a referring dataset; the source "
                f"{self.dataset} is a semantic one"
            )
        if self.target_domain in ("gta5", "synthia"):
            raise ValueError(
                f"target_dataset: {self.target_domain} ships no test split; the target of a "
                "semantic pair is cityscapes"
            )
        for name in ("split_by", "target_split_by", "target_image_dir"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: not used by the semantic datasets (leave it null)")
        return self

    @property
    def target_domain(self) -> str:
        """The target domain's dataset."""
        return self.target_dataset or self.dataset

    @property
    def on_disk(self) -> bool:
        return self.dataset != "synthetic"


class PrepareConfig(_Section):
    """How ``prepare`` treats bad samples of a dataset on disk."""

    on_bad_sample: Literal["error", "skip"] = Field(
        "error",
        description="error: stop naming the file and id; skip: count and log it, then go on.",
    )


class DMMIConfig(_Section):
    """DMMI's own params (``model.dmmi``; used when ``model.arch`` is ``dmmi``). "paper" values
    come from DMMI Section 5.1, "release" from its public code."""

    sim_weight: Annotated[float, Field(ge=0)] = Field(
        0.01, description="Weight of L_sim (Eq. 8) against L_seg (release)."
    )
    con_weight: Annotated[float, Field(ge=0)] = Field(
        0.01, description="Weight of L_con (Eq. 9) against L_seg (release)."
    )
    temperature: Annotated[float, Field(gt=0)] = Field(
        0.05, description="Contrastive temperature on cosine similarities (paper: logits x 20)."
    )
    windows: list[PositiveInt] = Field(
        default_factory=lambda: [1, 3, 5], description="MBA text-to-image window sides (paper)."
    )
    spans: list[PositiveInt] = Field(
        default_factory=lambda: [1, 2, 3], description="MBA image-to-text span lengths (paper)."
    )
    ccr_layers: PositiveInt = Field(1, description="CCR Transformer decoder layers (paper: 1).")
    ccr_heads: PositiveInt = Field(8, description="Attention heads of CCR (paper: 8).")

    @field_validator("windows")
    @classmethod
    def _odd_windows(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or any(k % 2 == 0 for k in v):
            raise ValueError(f"needs distinct odd window sides (a centred window), got {v}")
        return v

    @field_validator("spans")
    @classmethod
    def _distinct_spans(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"needs distinct span lengths, got {v}")
        return v


class ModelConfig(_Section):
    """Base network of SDA Appendix A, sized for CPU by default; or DMMI (``arch: dmmi``)."""

    arch: Literal["sda", "dmmi"] = Field(
        "sda", description="Base network: SDA's (Appendix A) or DMMI's (components.models.dmmi)."
    )
    dmmi: DMMIConfig = DMMIConfig()
    zero_interleave: bool = Field(
        False,
        description="Supervised phases spread one-to-zero samples evenly through each epoch "
        "(DMMI's sampler); off = a plain shuffle.",
    )
    backbone: Literal["convnet", "resnet18", "resnet34", "resnet50", "resnet101"] = "convnet"
    backbone_weights: str | None = Field(
        None,
        description="ImageNet weights of a resnet backbone: a local state dict with torchvision's "
        "keys (null = look in torch's hub cache; none found is an error).",
    )
    backbone_pretrained: bool = Field(
        True, description="false: a resnet backbone starts from a random init, on purpose."
    )
    widths: list[PositiveInt] = Field(
        default_factory=lambda: [16, 32, 64, 96], description="convnet stage widths."
    )
    hidden: PositiveInt = Field(64, description="Hidden size C of interaction / decoder.")
    embed_dim: PositiveInt = Field(64, description="Word embedding size of W.")
    embeddings: Literal["learned", "cooccurrence", "glove", "transformer"] = Field(
        "learned",
        description="Word embeddings W, trained on from: a random init (learned), vectors "
        "fitted on both domains' training query text without labels (cooccurrence: PPMI + "
        "SVD), GloVe (glove_path) or a BERT-family encoder's static word vectors "
        "(text_model_path).",
    )
    glove_path: str | None = None
    text_model_path: str | None = Field(
        None,
        description="Local directory of a BERT-family encoder (Hugging Face layout), read "
        "offline; its hidden size must equal embed_dim.",
    )
    clip_pooling: Literal["mean", "none"] = Field(
        "mean",
        description="Video datasets (a2d, jhmdb), arch sda: encode each frame of a sample's clip "
        "(data.clip_frames) and average the features over time (mean), or read the annotated "
        "frame alone (none).",
    )
    text_encoder: Literal["gru", "contextual"] = Field(
        "gru",
        description="gru: a Bi-GRU over the word embeddings W (SDA); contextual: the "
        "text_model_path encoder reads the whole query and is fine-tuned (DMMI's BERT).",
    )
    max_words: Annotated[int, Field(ge=2, le=64)] = 12
    scales: Annotated[int, Field(ge=1, le=4)] = Field(3, description="N_m (paper: 3 for images).")
    num_superpixels: Annotated[int, Field(ge=1, le=256)] = Field(
        48, description="N_r: region slots for region max-pooling (>= SLIC segments)."
    )
    empty_threshold: Fraction = Field(
        0.5, description="Predict an empty mask when the max response is below this (assumed)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.backbone == "convnet" and len(self.widths) < self.scales:
            raise ValueError(f"widths needs at least `scales` ({self.scales}) entries")
        if self.embeddings == "glove" and not self.glove_path:
            raise ValueError("glove_path is required when embeddings is 'glove'")
        if self.embeddings == "transformer" and not self.text_model_path:
            raise ValueError("text_model_path is required when embeddings is 'transformer'")
        if self.text_encoder == "contextual":
            if not self.text_model_path:
                raise ValueError("text_model_path is required when text_encoder is 'contextual'")
            if self.embeddings != "learned":
                raise ValueError(
                    f"embeddings: {self.embeddings} has no effect with text_encoder: contextual "
                    "(W is the encoder's own input embeddings); leave it at learned"
                )
        if self.arch == "dmmi" and self.hidden % self.dmmi.ccr_heads:
            raise ValueError(
                f"dmmi.ccr_heads ({self.dmmi.ccr_heads}) must divide hidden ({self.hidden})"
            )
        return self


class TrainConfig(_Section):
    """One supervised training phase run through Ray Train (pretrain, oracle)."""

    epochs: PositiveInt = 8
    batch_size: PositiveInt = 32
    lr: Annotated[float, Field(gt=0)] = Field(4e-4, description="Peak Adam lr (paper: 4e-4).")
    warmup_steps: NonNegInt = Field(100, description="Linear warm-up (paper: 300 steps).")
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    num_workers: PositiveInt = Field(1, description="Ray Train workers.")
    use_gpu: Literal["auto", True, False] = "auto"
    amp: Literal["auto", True, False] = Field(
        False,
        description="bfloat16 mixed precision in the training steps: false = float32; auto = "
        "where the worker's device computes bfloat16 natively (a GPU with bfloat16 units, a "
        "CPU with AMX / AVX512-BF16), float32 elsewhere; true = always (refused on a local CPU "
        "that would emulate it). Validation and inference stay float32.",
    )


class EvaluateConfig(_Section):
    batch_size: PositiveInt = 64
    splits: list[Literal["source_val", "target_val", "target_test"]] = Field(
        default_factory=lambda: ["source_val", "target_test"]
    )
    overlay_samples: NonNegInt = Field(16, description="Target images in the overlay grid.")


class SemanticsConfig(_Section):
    """Content-aware Semantic Modeling (SDA Section 3.2, Appendix B.1, D.1): stage ``semantics``."""

    enabled: bool = Field(True, description="CSM on; off = one category for every sample.")
    tau: Annotated[float, Field(gt=0)] = Field(0.2, description="Attention temperature (paper).")
    distance_threshold: Annotated[float, Field(gt=0, le=2)] = Field(
        0.5, description="Agglomerative cosine distance threshold (paper: 0.5)."
    )
    beta: Annotated[float, Field(gt=0, le=1)] = Field(0.5, description="rho = beta log k^s (paper)")
    similarity_temperature: Annotated[float, Field(gt=0)] = Field(
        0.05, description="Eq. 2 on cosine similarities / this (assumed)."
    )
    boundary: bool = Field(True, description="Entropy boundary on; off = all target reliable.")
    extraction: Literal["attentive", "mean_visual", "mean_text"] = Field(
        "attentive", description="Eq. 1, or the mean-pooling(v) / mean-pooling(t) ablations."
    )
    content: Literal["embedding", "encoded"] = Field(
        "embedding", description="Content from word embeddings W (paper) or encoded Q."
    )
    predictor: bool = Field(True, description="Predict target word weights (Appendix B.1).")
    predictor_epochs: PositiveInt = Field(5, description="paper")
    predictor_loss: Literal["l1", "kl"] = Field("l1", description="paper: L1")
    clustering: Literal["agglomerative", "kmeans", "spectral"] = "agglomerative"
    n_clusters: PositiveInt | None = Field(None, description="For kmeans / spectral only.")
    max_exact: Annotated[int, Field(ge=2)] = Field(
        5000, description="Distinct vectors clustered exactly; more are pre-clustered."
    )
    word_grounding: Literal["none", "visual"] = Field(
        "visual",
        description="visual: give each target-only word the embedding of the known word whose "
        "presence in the target images (the stage-1 model's response) best follows the word's "
        "use in their queries; no labels (components.adaptation.sda.grounding).",
    )
    grounding_min_score: float | Literal["chance"] = Field(
        "chance",
        description="Least correlation over target images for a word to be grounded; chance: "
        "the level chance reaches with probability grounding_alpha (a permutation test).",
    )
    grounding_alpha: Annotated[float, Field(ge=0.001, lt=1)] = Field(
        0.05,
        description="grounding_min_score: chance's error rate over all pairs tested (at least "
        "0.001: the test draws 1000 random pairings).",
    )

    @field_validator("grounding_min_score", mode="before")
    @classmethod
    def _min_score(cls, v):
        if v == "chance" or (isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1):
            return v
        raise ValueError(f"a correlation in (0, 1] or 'chance', not {v!r}")

    @model_validator(mode="after")
    def _cluster_count(self) -> SemanticsConfig:
        if self.clustering != "agglomerative" and not self.n_clusters:
            raise ValueError(f"n_clusters is required when clustering is {self.clustering!r}")
        return self


class InitConfig(TrainConfig):
    """SDA stage 2 (stage ``init``): L_seg + L_si from the stage-1 weights."""

    epochs: PositiveInt = 3
    si: bool = Field(True, description="L_si on; off = the w/o L_si ablation (L_seg only).")
    si_weight: Annotated[float, Field(ge=0)] = Field(1.0, description="assumed")
    si_temperature: Annotated[float, Field(gt=0)] = Field(0.1, description="assumed")


class MasksConfig(TrainConfig):
    """Multi-label classifier + CAM for semantic-based target masks (Appendix B.2)."""

    epochs: PositiveInt = Field(5, description="CAM epochs (IRN reference: 5).")
    lr: Annotated[float, Field(gt=0)] = 1e-3
    init_encoder: bool = Field(
        True, description="Start from a copy of the stage-1 visual encoder (assumed)."
    )
    fg_threshold: Fraction = Field(0.3, description="CAM foreground threshold (IRN: 0.30).")
    score_threshold: Fraction = Field(
        0.5,
        description="A sample's mask is kept only where the classifier's sigmoid score for "
        "its category on the image reaches this (assumed).",
    )
    cam_last_stride: Literal[1, 2] = Field(
        1,
        description="1: the classifier's last stage keeps its resolution (CAM at 1/4 of the "
        "image, as CAM / IRN drop the last stride); 2: the encoder's 1/8.",
    )
    pooling: Literal["lse", "gap", "max"] = Field(
        "lse",
        description="Class maps to image logits: lse (log-sum-exp, a soft maximum), gap "
        "(CAM's average), max. Which one localises depends on the data (see the README).",
    )
    lse_r: Annotated[float, Field(gt=0)] = Field(5.0, description="Sharpness of lse pooling.")
    drop_predicted_empty: bool = Field(
        True,
        description="A query the stage-1 model finds nothing for adds no category to its "
        "image's labels (the label-free stand-in for a one-to-zero query; false: every "
        "query's category counts).",
    )
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1,
        description="Share of target train images (by id) held out for the classifier's "
        "label-free val mAP against their pseudo-labels; 0 = none.",
    )


class AdaptConfig(TrainConfig):
    """Stage ``adapt``: the adaptation method ``method`` and its schedule; the method's own
    params live in its section ``adapt.<method>`` (``components.adaptation.configs``)."""

    method: Literal[tuple(METHOD_CONFIGS)] = Field(  # type: ignore[valid-type]
        "sda", description="The method: a key of components.adaptation.registry.METHODS."
    )
    epochs: PositiveInt = Field(3, description="paper: 10")
    batch_size: PositiveInt = Field(16, description="Per domain (paper: 8).")
    lr: Annotated[float, Field(gt=0)] = Field(1e-4, description="assumed (continued training)")
    warmup_steps: NonNegInt = 20
    label_free_metrics: bool = Field(
        False,
        description="Also report the label-free model-selection criteria every epoch "
        "(components.selection: IM, SND, DEV, source-val metrics); sweeps always do.",
    )
    source_only: SourceOnlyConfig | None = None
    sda: SDAConfig | None = None
    dacs: DACSConfig | None = None
    mmd: MMDConfig | None = None
    dann: DANNConfig | None = None
    t2s: T2SConfig | None = None
    dida: DIDAConfig | None = None
    cdanet: CDANetConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_section(cls, raw: Any) -> Any:
        # the selected method's section may be left out: its defaults apply
        if isinstance(raw, dict):
            method = raw.get("method", "sda")
            if method in METHOD_CONFIGS and raw.get(method) is None:
                raw = {**raw, method: {}}
        return raw

    @model_validator(mode="after")
    def _one_section(self) -> AdaptConfig:
        stray = [m for m in METHOD_CONFIGS if m != self.method and getattr(self, m) is not None]
        if stray:
            raise ValueError(
                f"section adapt.{stray[0]} is given but adapt.method is {self.method!r} "
                f"(remove it or set it to null, e.g. `dvc exp run -S adapt.{stray[0]}=null`; "
                f"or set adapt.method: {stray[0]})"
            )
        return self

    @property
    def method_config(self) -> MethodSection:
        """The selected method's section (``adapt.<method>``)."""
        return getattr(self, self.method)


#: every upper bound of an ORDERED pair a sweep draws stays this far above the smallest lower
GAMMA_MARGIN = 2e-3
#: label-free criteria a sweep can rank trials by (no target labels read)
LABEL_FREE_METRICS = (
    "unsup_confidence",
    "unsup_agreement",
    "unsup_im",
    "unsup_snd",
    "unsup_dev",
    "src_val_oiou",
    "src_val_miou",
)
TUNE_METRICS = ("val_oiou", "val_miou", "val_map", *LABEL_FREE_METRICS)


def tunable_sections(params: Params) -> dict[str, type[_Section]]:
    """What a sweep trial can change (see pipelines/tune.py): CSM, the adaptation schedule and
    the selected method's own section, by dotted section name."""
    method = params.adapt.method
    return {
        "semantics": SemanticsConfig,
        "adapt": AdaptConfig,
        f"adapt.{method}": METHOD_CONFIGS[method],
    }


def ordered_pairs(params: Params) -> list[tuple[str, str, float, float]]:
    """The selected method's ``low < high`` rules as dotted keys with their current values:
    ``[("adapt.sda.gamma_min", "adapt.sda.gamma_max", 0.1, 0.9)]``."""
    method, section = params.adapt.method, params.adapt.method_config
    return [
        (f"adapt.{method}.{lo}", f"adapt.{method}.{hi}", getattr(section, lo), getattr(section, hi))
        for lo, hi in section.ORDERED
    ]


class SearchDim(_Section):
    """One entry of ``tune.space``: a list of ``values`` (grid / choice), or a ``low``-``high``
    range sampled uniformly (``log: true`` for log-uniform) by random and Optuna search."""

    values: list[float | int | bool | str] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _shape(self) -> SearchDim:
        if self.values is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either values or low/high, not both")
            if not self.values:
                raise ValueError("values is empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs values, or both low and high")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log-uniform needs low > 0")
        return self

    def candidates(self) -> list:
        """The values that bound what this entry can produce (for validation)."""
        return list(self.values) if self.values is not None else [self.low, self.high]


def _default_space() -> dict[str, SearchDim]:
    # SDA's sensitivity studies: Fig. 5 (tau), Fig. 6 (beta), Fig. 10 (distance threshold),
    # Table 9 (gamma_max / gamma_min); plus the contrastive temperature and the loss weights.
    return {
        "semantics.tau": SearchDim(low=0.01, high=1.0, log=True),
        "semantics.beta": SearchDim(low=0.1, high=1.0),
        "semantics.distance_threshold": SearchDim(low=0.3, high=0.8),
        "adapt.sda.gamma_max": SearchDim(low=0.6, high=0.95),
        "adapt.sda.gamma_min": SearchDim(low=0.05, high=0.4),
        "adapt.sda.contrast_temperature": SearchDim(low=0.03, high=0.5, log=True),
        "adapt.sda.lambda1": SearchDim(low=0.1, high=2.0, log=True),
        "adapt.sda.lambda2": SearchDim(low=0.01, high=1.0, log=True),
    }


_DIM_KEYS = {"values", "low", "high", "log"}


def _flatten_space(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested ``{adapt: {sda: {gamma_max: {low: ..}}}}`` -> ``{"adapt.sda.gamma_max": ..}``;
    a mapping whose keys are all SearchDim fields is an entry."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not set(value) <= _DIM_KEYS:
            out.update(_flatten_space(value, dotted + "."))
        else:
            out[dotted] = value
    return out


class TuneConfig(_Section):
    """Ray Tune sweep over SDA's temperatures, thresholds and loss weights (stage ``tune``)."""

    search: Literal["grid", "random", "optuna"] = "random"
    num_samples: PositiveInt = Field(16, description="Trials (grid: repeats of the whole grid).")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha = early stopping.")
    grace_period: PositiveInt = Field(1, description="ASHA: epochs before a trial can stop.")
    reduction_factor: Annotated[float, Field(gt=1)] = Field(2.0, description="ASHA eta.")
    metric: Literal[TUNE_METRICS] = Field(  # type: ignore[valid-type]
        "val_oiou",
        description="Objective (maximised): val_* on the labeled target val split, or an "
        "unsupervised criterion that needs no target labels.",
    )
    epochs: PositiveInt = Field(3, description="Adaptation epochs per trial (ASHA max_t).")
    max_concurrent: PositiveInt | None = Field(None, description="null = as resources allow.")
    max_failures: NonNegInt = Field(1, description="Retries of a crashed trial.")
    cpus_per_trial: Annotated[float, Field(gt=0)] = Field(1.0, description="Fractions allowed.")
    gpus_per_trial: Annotated[float, Field(ge=0)] = Field(0.0, description="e.g. 0.25 = 4/GPU.")
    storage_path: str | None = Field(
        None, description="Trial storage (dir or URI); null = runtime.storage_path/tune."
    )
    name: str | None = Field(None, description="Sweep name; null = derived from its inputs.")
    space: dict[str, SearchDim] = Field(
        default_factory=_default_space,
        description="Nested like params (semantics: {tau: ..}, adapt: {sda: {gamma_max: ..}}); "
        "held as dotted keys.",
    )

    @field_validator("space", mode="before")
    @classmethod
    def _nested_space(cls, raw: Any) -> Any:
        return _flatten_space(raw) if isinstance(raw, dict) else raw

    def flat_space(self) -> dict[str, SearchDim]:
        """``{"semantics.tau": SearchDim, ...}`` in a stable order."""
        return dict(self.space)

    @model_validator(mode="after")
    def _space(self) -> TuneConfig:
        if not self.flat_space():
            raise ValueError("space is empty")
        if self.search == "grid":
            ranged = [k for k, d in self.flat_space().items() if d.values is None]
            if ranged:
                raise ValueError(f"grid search needs `values` for {', '.join(ranged)}")
        if self.scheduler == "asha" and self.grace_period > self.epochs:
            raise ValueError(f"grace_period ({self.grace_period}) > epochs ({self.epochs})")
        return self


def _check_space(params: Params) -> list[str]:
    """Every ``tune.space`` entry names a tunable field and only yields values it accepts;
    every upper bound of an ordered pair leaves room for a lower value below it."""
    from pydantic import TypeAdapter

    errors = []
    space = params.tune.flat_space()
    sections = tunable_sections(params)
    for key, dim in space.items():
        section, _, name = key.rpartition(".")
        where = f"tune.space.{key}"
        other = section.startswith("adapt.") and section[6:] in METHOD_CONFIGS
        if other and section[6:] != params.adapt.method:
            errors.append(
                f"{where}: adapt.method is {params.adapt.method!r} "
                f"(sweep its fields as adapt.{params.adapt.method}.<field>, or drop them: "
                f"`-S tune.space=null`)"
            )
            continue
        if section not in sections:
            errors.append(
                f"{where}: not a tunable parameter (use "
                + ", ".join(f"{s}.<field>" for s in sections)
                + ")"
            )
            continue
        fields = sections[section].model_fields
        if name not in fields or (section == "adapt" and name in METHOD_CONFIGS):
            errors.append(f"{where}: unknown parameter")
            continue
        info = fields[name]
        if info.annotation is int and not all(float(v).is_integer() for v in dim.candidates()):
            errors.append(f"{where}: {key} is an integer: give integer values / bounds")
            continue
        adapter = TypeAdapter(Annotated[info.annotation, *info.metadata])
        for value in dim.candidates():
            try:
                adapter.validate_python(value)
            except ValidationError as err:
                msg = err.errors()[0]["msg"]
                errors.append(f"{where}: value {value!r} is refused by {key}: {msg}")
                break
    # every upper value the sweep can draw must leave room for some lower value below it
    for lo_key, hi_key, lo, hi in ordered_pairs(params):
        floor = min(space[lo_key].candidates()) if lo_key in space else lo
        top = space.get(hi_key)
        tops = [hi] if top is None else top.values if top.values is not None else [top.high]
        tight = [v for v in tops if v <= floor + GAMMA_MARGIN]
        if tight:
            low_name = lo_key.rpartition(".")[2]
            errors.append(
                f"tune.space.{hi_key}: {tight[0]} leaves no {low_name} below it "
                f"(smallest {low_name}: {floor})"
            )
    return errors


class CompareConfig(_Section):
    """The methods comparison (``compare/dvc.yaml``): every method x task x seed."""

    methods: list[Literal[tuple(METHOD_CONFIGS)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["sda", "dacs", "mmd", "dann", "t2s", "dida", "cdanet"],
        description="Methods to run (a method skips the tasks it does not support).",
    )
    tasks: list[Literal["referring", "semantic"]] = Field(
        default_factory=lambda: ["referring", "semantic"]
    )
    seeds: list[NonNegInt] = Field(default_factory=lambda: [0, 1, 2])
    max_concurrent: PositiveInt | None = Field(
        None, description="Runs at once; null = as many as the Ray cluster's CPUs allow."
    )
    cpus_per_run: PositiveInt = Field(2, description="CPUs one run needs (to size concurrency).")
    sections: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-method params, adapt.<method> for the comparison: {dacs: {ema: 0.999}}.",
    )

    @model_validator(mode="after")
    def _lists(self) -> CompareConfig:
        for name in ("methods", "tasks", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} is empty")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice")
        for method, section in self.sections.items():
            if method not in METHOD_CONFIGS:
                raise ValueError(f"sections.{method}: unknown method")
            try:
                METHOD_CONFIGS[method].model_validate(section)
            except ValidationError as err:
                e = err.errors()[0]
                where = ".".join(str(p) for p in e["loc"])
                raise ValueError(f"sections.{method}.{where}: {e['msg']}") from None
        return self


class Params(_Section):
    """The whole params.yaml."""

    seed: NonNegInt = 0
    runtime: RuntimeConfig
    data: DataConfig
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig
    pretrain: TrainConfig
    oracle: TrainConfig
    evaluate: EvaluateConfig
    semantics: SemanticsConfig
    init: InitConfig
    masks: MasksConfig
    adapt: AdaptConfig
    tune: TuneConfig = TuneConfig()
    compare: CompareConfig = CompareConfig()

    @model_validator(mode="before")
    @classmethod
    def _method_default_space(cls, raw: Any) -> Any:
        # without a tune.space, a method other than SDA sweeps its schedule's learning rate;
        # ``tune.space: null`` means the same, so `dvc exp run -S tune.space=null` can switch
        if not isinstance(raw, dict):
            return raw
        method = (raw.get("adapt") or {}).get("method", "sda")
        tune = raw.get("tune") or {}
        if isinstance(tune, dict) and "space" in tune and tune["space"] is None:
            tune = {k: v for k, v in tune.items() if k != "space"}
            raw = {**raw, "tune": tune}
        if method != "sda" and "space" not in tune:
            space = {"adapt.lr": {"values": [3e-5, 1e-4, 3e-4]}}
            raw = {**raw, "tune": {**tune, "space": space}}
        return raw

    @model_validator(mode="after")
    def _tune_space(self) -> Params:
        if self.model.arch == "dmmi" and self.data.task != "referring":
            raise ValueError("model.arch: dmmi is a referring network (data.task: referring)")
        supported = self.adapt.method_config.TASKS
        if self.data.task not in supported:
            raise ValueError(
                f"adapt.method: {self.adapt.method} does not run on data.task "
                f"{self.data.task!r} (supports: {', '.join(supported)})"
            )
        errors = _check_space(self)
        if errors:
            raise ValueError("; ".join(errors))
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid params"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        if e["type"] == "missing":
            msg = "missing section" if len(e["loc"]) == 1 else "missing field"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        if loc:
            lines.append(f"  {loc}: {msg}")
        else:  # cross-section rules name their fields in the message
            lines.extend(f"  {m}" for m in msg.split("; "))
    return "\n".join(lines)


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate a raw mapping (as read from YAML) into :class:`Params`.

    Raises:
        ParamsError: naming every offending field as a dotted path.
    """
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, source)) from None


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    """Read, apply dotted ``overrides`` (``{"pretrain.epochs": 3}``) and validate params."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return parse_params(raw, str(path))


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw["a"]["b"] = value`` for ``key == "a.b"``. A top-level section must exist (a
    typo is refused); a missing or null mapping below it is created, as ``dvc exp run -S``
    does (``adapt.dacs.ema=0.999`` when params.yaml has no ``adapt.dacs``)."""
    *parents, leaf = key.split(".")
    node = raw
    for depth, p in enumerate(parents):
        if depth > 0 and node.get(p) is None:
            node[p] = {}
        if not isinstance(node.get(p), dict):
            raise ParamsError(f"override {key}: no section {p!r}")
        node = node[p]
    node[leaf] = value


def section_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain JSON-able dict of a config section (for MLflow params and hashing)."""
    return cfg.model_dump(mode="json")
