"""Hugging Face transformers integration: `convert(model)` swaps each sparse-MoE block of
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and GPT-OSS for an MoELayer with the same
weights; `to_hf_state_dict(model)` gives the weights back in the original layout;
`generate(model, input_ids)` generates on each rank's own prompts (or none), every rank serving
the others' exchanges until all are done (generate.py); `from_pretrained(path)` builds the
converted model from a checkpoint, each rank reading the dense weights and its own experts only
(load.py).

Needs transformers (`pip install schedmoe[hf]`) only to build the models; this package does not
import it.

Built on the layer. May import: `errors`, `layer`, `comm/`, `parallel/`.
"""

from .convert import HFMoEBlock, convert, to_hf_state_dict
from .families import FAMILIES
from .generate import generate, serve
from .load import from_pretrained

__all__ = ["convert", "to_hf_state_dict", "from_pretrained", "generate", "serve", "HFMoEBlock",
           "FAMILIES"]
