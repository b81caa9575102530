"""The one place model contracts live: Triton model names, tensor names, dtypes and shapes, segmentation
label tables, and the geometry of each model's input. ONNX export, the Triton client, the model
repository's config.pbtxt files and the preprocessing all read them from here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cspine.domain import Modality


class DType(str, enum.Enum):
    """Triton data types used by cspine (names as in config.pbtxt without the TYPE_ prefix)."""

    FP32 = "FP32"
    UINT8 = "UINT8"

    @property
    def numpy(self) -> str:
        return {"FP32": "float32", "UINT8": "uint8"}[self.value]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: DType
    shape: tuple[int, ...]  # without the batch axis; -1 is a dynamic axis


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int  # > 0: a leading batch axis on every tensor; 0: shapes are complete as written

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class SegGeometry:
    """How a modality's images become segmentation inputs: a square in-plane grid of ``size`` pixels at
    ``spacing_mm``, with ``context`` neighbouring slices on each side as extra channels (2.5D). Slices
    thinner than ``slab_mm`` are averaged in slabs of at most that thickness (a 0.5 mm CT becomes 2 mm
    slabs, the slice spacing the model was trained on most, and a quarter of the slices to segment and
    measure: with 1.5 mm slabs the CT model split or invented discs and levels were miscounted in 3 of 12
    SYNTHETIC real-size CTs, with 2 mm slabs in none)."""

    spacing_mm: float
    size: int
    context: int
    slab_mm: float | None = None

    @property
    def channels(self) -> int:
        return 2 * self.context + 1


# Segmentation label tables, one per modality (index = label value in the model's output).
# CT cannot tell cord from CSF, so it segments the canal; MR does not segment OPLL (CT does); the
# radiograph labels C2 … C7 bodies one by one for the Cobb angle.
SEG_LABELS: dict[Modality, tuple[str, ...]] = {
    Modality.CT: ("background", "vertebral_body", "posterior_elements", "disc", "canal", "opll", "tumor"),
    Modality.MR: ("background", "vertebral_body", "posterior_elements", "disc", "csf", "cord", "tumor"),
    Modality.XR: (
        "background",
        "c2_body",
        "c3_body",
        "c4_body",
        "c5_body",
        "c6_body",
        "c7_body",
        "other_body",
        "posterior_elements",
        "disc",
        "tumor",
    ),
}

SEG_GEOMETRY: dict[Modality, SegGeometry] = {
    Modality.CT: SegGeometry(spacing_mm=1.0, size=160, context=1, slab_mm=2.0),
    Modality.MR: SegGeometry(spacing_mm=1.0, size=192, context=0),
    Modality.XR: SegGeometry(spacing_mm=0.75, size=256, context=0),
}

SEG_MODEL_NAMES: dict[Modality, str] = {Modality.CT: "seg_ct", Modality.MR: "seg_mr", Modality.XR: "seg_xr"}
# Besides the label map, each segmentation model returns its encoder's deepest feature map averaged over the
# image (one vector per slice): the competence check's out-of-distribution score compares them with the
# training images' (analysis/competence.py). Its width is the U-Net's deepest width.
SEG_FEATURES = 96

# Lesion regions of interest: three 64 × 64 planes at 1 mm around the lesion centre (see imaging.roi).
ROI_SIZE = 64
ROI_SPACING_MM = 1.0
ROI_CHANNELS = 3
EMBEDDING_DIM = 64
MODALITY_ORDER: tuple[Modality, ...] = (Modality.CT, Modality.MR, Modality.XR)  # one-hot order of "modality"

# Tensor names, written once: the specs below and every caller that feeds or reads a tensor use these.
IMAGE_TENSOR = "image"  # segmentation input: a batch of slices with their context channels
LABELS_TENSOR = "labels"  # segmentation output: the label map per slice
FEATURES_TENSOR = "features"  # segmentation output: pooled encoder features per slice (competence)
ROI_TENSOR = "roi"  # lesion regions of interest
MODALITY_TENSOR = "modality"  # each ROI's modality, one-hot in MODALITY_ORDER
PROTOTYPES_TENSOR = "prototypes"  # one prototype per class
EMBEDDING_TENSOR = "embedding"  # one embedding per lesion
PROBABILITIES_TENSOR = "probabilities"  # per lesion, one probability per prototype


def _seg_spec(modality: Modality) -> ModelSpec:
    g = SEG_GEOMETRY[modality]
    return ModelSpec(
        name=SEG_MODEL_NAMES[modality],
        inputs=(TensorSpec(IMAGE_TENSOR, DType.FP32, (g.channels, g.size, g.size)),),
        outputs=(
            TensorSpec(LABELS_TENSOR, DType.UINT8, (g.size, g.size)),
            TensorSpec(FEATURES_TENSOR, DType.FP32, (SEG_FEATURES,)),
        ),
        max_batch_size=64,
    )


SEG_CT = _seg_spec(Modality.CT)
SEG_MR = _seg_spec(Modality.MR)
SEG_XR = _seg_spec(Modality.XR)
LESION_EMBED = ModelSpec(
    name="lesion_embed",
    inputs=(
        TensorSpec(ROI_TENSOR, DType.FP32, (ROI_CHANNELS, ROI_SIZE, ROI_SIZE)),
        TensorSpec(MODALITY_TENSOR, DType.FP32, (len(MODALITY_ORDER),)),
    ),
    outputs=(TensorSpec(EMBEDDING_TENSOR, DType.FP32, (EMBEDDING_DIM,)),),
    max_batch_size=64,
)
# Largest embedding and prototype counts one proto_classify call takes on GPU (TensorRT profiles need a
# bound for every dynamic axis); the gateway never sends more lesions or classes than this.
MAX_EMBEDDINGS = 64
MAX_PROTOTYPES = 64
# Prototypes are an input, so classes can change without reloading the model. No Triton batching: each
# request brings its own prototype set; N embeddings against K prototypes give N × K probabilities.
PROTO_CLASSIFY = ModelSpec(
    name="proto_classify",
    inputs=(
        TensorSpec(EMBEDDING_TENSOR, DType.FP32, (-1, EMBEDDING_DIM)),
        TensorSpec(PROTOTYPES_TENSOR, DType.FP32, (-1, EMBEDDING_DIM)),
    ),
    outputs=(TensorSpec(PROBABILITIES_TENSOR, DType.FP32, (-1, -1)),),
    max_batch_size=0,
)

MODELS: dict[str, ModelSpec] = {m.name: m for m in (SEG_CT, SEG_MR, SEG_XR, LESION_EMBED, PROTO_CLASSIFY)}

# Triton ensemble (no ONNX file of its own): lesion ROIs → lesion_embed → proto_classify in one call, giving
# the embeddings and the probabilities of N lesions against K prototypes.
LESION_CLASSIFY = ModelSpec(
    name="lesion_classify",
    inputs=(
        TensorSpec(ROI_TENSOR, DType.FP32, (-1, ROI_CHANNELS, ROI_SIZE, ROI_SIZE)),
        TensorSpec(MODALITY_TENSOR, DType.FP32, (-1, len(MODALITY_ORDER))),
        TensorSpec(PROTOTYPES_TENSOR, DType.FP32, (-1, EMBEDDING_DIM)),
    ),
    outputs=(
        TensorSpec(EMBEDDING_TENSOR, DType.FP32, (-1, EMBEDDING_DIM)),
        TensorSpec(PROBABILITIES_TENSOR, DType.FP32, (-1, -1)),
    ),
    max_batch_size=0,
)
ENSEMBLES: dict[str, ModelSpec] = {LESION_CLASSIFY.name: LESION_CLASSIFY}
SERVED: dict[str, ModelSpec] = {**MODELS, **ENSEMBLES}  # every model Triton serves


def seg_spec(modality: Modality) -> ModelSpec:
    return MODELS[SEG_MODEL_NAMES[modality]]
