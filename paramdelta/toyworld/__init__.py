"""The toy world: ParamΔ shown end to end on models trained here, in minutes, on a CPU.

Made-up people (birth city and year, occupation, home city, mentor) and cities (country) give
facts A and facts B. Four models share one small Llama config and one tokenizer:
base (pretrained on facts A), post (base + instruction tuning on questions about facts A),
new base (base + continued pretraining on facts A ∪ B) and reference (new base + the same
instruction tuning). ParamΔ = post − base + new base should answer questions about facts B in
the instruction format, which neither post (never saw B) nor new base (never saw the format)
can. Numbers measured on the shipped checkpoints: README.md in this folder.

>>> from paramdelta.toyworld import WorldSpec, write_world
>>> write_world("runs/world", WorldSpec(seed=0))["vocab_size"]      # doctest: +SKIP
607
"""

from .build import write_world
from .world import WorldSpec, make_world

__all__ = ["WorldSpec", "make_world", "write_world"]
