"""Building blocks: fully connected layers, encoders, decoders, classifier."""

from ._encoders import Classifier, DecoderSCVI, Encoder, LinearDecoderSCVI
from ._label_head import LabelHead
from ._layers import CovariateLinear, FCLayers, SparseRows, csr_with_values

__all__ = [
    "Classifier",
    "CovariateLinear",
    "DecoderSCVI",
    "Encoder",
    "FCLayers",
    "LabelHead",
    "LinearDecoderSCVI",
    "SparseRows",
    "csr_with_values",
]
