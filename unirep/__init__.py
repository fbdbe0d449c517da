"""unirep: representation alignment across domains (domain-agnostic core).

Token sets, frozen encoders, tokenizers, alignment losses and metrics, flow matching and one trainer.
This package never imports ``vision`` or ``molecular``. Submodules: ``unirep.tokens``, ``unirep.encoders``,
``unirep.tokenizers``, ``unirep.align``, ``unirep.metrics``, ``unirep.flow``, ``unirep.train``, ``unirep.converge``.
"""

from unirep.align import Aligner, ProjectorMLP
from unirep.encoders import Encoder, FrozenEncoder
from unirep.flow import FlowMatching, sample_ode, sample_sde
from unirep.metrics import cka, cknna, mutual_knn, prepare_features, svcca, unbiased_cka
from unirep.tokenizers import IdentityTokenizer, Tokenizer
from unirep.tokens import TokenSet

__all__ = [
    "TokenSet",
    "Encoder",
    "FrozenEncoder",
    "Tokenizer",
    "IdentityTokenizer",
    "Aligner",
    "ProjectorMLP",
    "FlowMatching",
    "sample_ode",
    "sample_sde",
    "mutual_knn",
    "cka",
    "unbiased_cka",
    "cknna",
    "svcca",
    "prepare_features",
]
__version__ = "0.1.0"
