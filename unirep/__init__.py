"""unirep: representation alignment across domains (domain-agnostic core).

Token sets, frozen encoders, tokenizers, alignment losses and metrics, flow matching and one trainer.
This package never imports ``vision`` or ``molecular``.
"""

from unirep.encoders import Encoder, FrozenEncoder
from unirep.tokenizers import IdentityTokenizer, Tokenizer
from unirep.tokens import TokenSet

__all__ = ["TokenSet", "Encoder", "FrozenEncoder", "Tokenizer", "IdentityTokenizer"]
__version__ = "0.1.0"
