"""big_vision_lite: PaliGemma-family vision-language models in JAX/Flax.

Public API (names only; the logic lives in the modules):
  load, save       checkpoints (big_vision .npz, Hugging Face folders, training workdirs)
  Tokenizer        SentencePiece + <loc>/<seg> helpers
  generate         batched cached decoding
"""
import importlib

_API = {
    "load": "big_vision_lite.checkpoints",
    "save": "big_vision_lite.checkpoints",
    "Tokenizer": "big_vision_lite.tokenizer",
    "generate": "big_vision_lite.decode",
}

__all__ = sorted(_API)


def __getattr__(name):
  # Lazy so that `import big_vision_lite` stays cheap and submodules import standalone.
  if name in _API:
    return getattr(importlib.import_module(_API[name]), name)
  raise AttributeError(f"module 'big_vision_lite' has no attribute {name!r}")
