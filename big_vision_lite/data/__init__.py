"""Input pipeline: sources (TFDS, JSONL, demo), pp ops + their string DSL, grain batching.

  make_train_iterator(config.input, tokenizer=, seed=, data_sharding=) -> TrainIterator
  eval_examples(data_cfg, pp, tokenizer=, ...) -> iterable of example dicts (this process)
  Preprocess(pp_string, PPContext(...)) -> callable over one example dict
  combine_and_keep_train / combine_and_keep_eval: the PaliGemma text layout as a pp string
  demo_pp / demo_mixture / demo_tokenizer / demo_sentences: the embedded demo dataset
See pipeline.py for the config schema and the trainer contract.
"""
import importlib

_API = {
    "make_train_iterator": "pipeline", "eval_examples": "pipeline", "EvalExamples": "pipeline",
    "TrainIterator": "pipeline", "InputError": "pipeline", "parse_input_config": "pipeline",
    "Preprocess": "pp_parse", "PPContext": "pp_parse", "PPError": "pp_parse",
    "ExampleError": "pp_parse", "Runtime": "pp_parse", "registered_ops": "pp_parse",
    "combine_and_keep_train": "pp_text", "combine_and_keep_eval": "pp_text",
    "make_source": "sources",
    "demo_pp": "demo", "demo_mixture": "demo", "demo_tokenizer": "demo",
    "demo_sentences": "demo", "DemoSource": "demo",
}

__all__ = sorted(_API)


def __getattr__(name):
  # Lazy: grain worker processes unpickle pp functions without importing grain/jax twice.
  if name in _API:
    return getattr(importlib.import_module(f"big_vision_lite.data.{_API[name]}"), name)
  raise AttributeError(f"module 'big_vision_lite.data' has no attribute {name!r}")
