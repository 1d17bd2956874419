"""Greedy decoding after prefill, big_vision_lite vs transformers `generate`, in one process.

  python bench/decode.py                    # CPU, the issue's shapes, float32
  python bench/decode.py --device gpu       # PaliGemma 3B shapes, bfloat16, CUDA
  python bench/decode.py --profile /tmp/tr  # + the heaviest ops per decoding step (CPU)

The same random model in both (bench/paligemma_pair.py), a batch of 8 images (224 px) with
16-token prompts (bos + 14 + "\\n", no padding), 32 new tokens, greedy. One timed call
covers the whole generation: image encoding, prefill, 32 decoding steps and the tokens back
on the host. Ours: decode.Decoder(...).decode (one jitted prefill + while_loop). Reference:
PaliGemmaForConditionalGeneration.generate(do_sample=False, max_new_tokens=32), under
torch.inference_mode; attention ("eager" / "sdpa") and KV cache ("dynamic" / "static")
implementations are picked by timing during warm-up (--hf_attn/--hf_cache auto).

EOS (id 1) stays allowed in both, as in real use; with random weights it is rarely produced.
The report says how many tokens each produced and how many of ours equal the reference's
(greedy on the same weights: they should all match unless two logits tie within float
noise). Tokens/s counts B x 32 (the tokens asked for).

The last line of stdout is one JSON object: {"bench": "decode", "ratio": ..., "ours_tok_s":
..., "ref_tok_s": ..., ...}.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paligemma_pair as pair  # noqa: E402  pylint: disable=g-import-not-at-top
import xprof  # noqa: E402  pylint: disable=g-import-not-at-top

PROMPT_LEN = 16


def prompts_and_images(cfg, batch_size: int, seed: int = 0):
  from big_vision_lite.models import paligemma  # pylint: disable=g-import-not-at-top
  rcfg = paligemma.resolve_config(cfg)
  size, vocab = rcfg["img"]["image_size"], rcfg["llm"]["vocab_size"]
  rs = np.random.RandomState(seed)
  prompts = [[2, *rs.randint(3, min(vocab, 256000), PROMPT_LEN - 2).tolist(), 108]
             for _ in range(batch_size)]
  images = rs.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32)
  return prompts, images


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--model", default=None,
                      help='JSON overriding model config keys, e.g. \'{"llm": {"vocab_size": '
                      '1000}}\' (tests run tiny models)')
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--hf_attn", default="auto", choices=("auto", "eager", "sdpa"))
  parser.add_argument("--hf_cache", default="auto", choices=("auto", "dynamic", "static"))
  parser.add_argument("--skip_ref", action="store_true")
  parser.add_argument("--profile", default=None,
                      help="folder: trace one more of our calls (jax profiler, CPU) and report "
                      "the heaviest ops, per decoding step")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from big_vision_lite import decode  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  if args.device == "gpu" and jax.devices()[0].platform != "gpu":
    raise SystemExit(f"--device gpu: jax sees {jax.devices()}, no GPU")
  cfg = pair.model_config(args.device, args.model)
  b, m = args.batch_size, args.new_tokens
  print(f"config: {json.dumps(cfg)}  batch {b}, prompt {PROMPT_LEN}, {m} new tokens", flush=True)
  params = pair.init_params(cfg)
  prompts, images = prompts_and_images(cfg, b)
  folder = tempfile.mkdtemp(prefix="bvl_bench_hf_")
  ref_model = None if args.skip_ref else pair.to_transformers(
      cfg, params, folder, device=args.device,
      attn_implementation="eager" if args.hf_attn == "auto" else args.hf_attn).eval()

  decoder = decode.Decoder(cfg)

  def ours(new_tokens=m):
    return decoder.decode(params, images, prompts, max_decode_len=new_tokens)  # numpy

  t0 = time.perf_counter()
  our_out = ours()
  compile_s = time.perf_counter() - t0
  print(f"ours: first call (compile + run) {compile_s:.1f} s, {our_out.steps} steps", flush=True)
  fns, result = {"ours": ours}, {}
  if ref_model is not None:
    dev = "cuda" if args.device == "gpu" else "cpu"
    n_img = pair.num_image_tokens(cfg)
    ids = np.concatenate([np.full((b, n_img), pair.vocab_size(cfg)), np.asarray(prompts)], 1)
    inputs = {"input_ids": torch.from_numpy(ids).to(dev),
              "attention_mask": torch.ones(ids.shape, dtype=torch.long, device=dev),
              "token_type_ids": torch.zeros(ids.shape, dtype=torch.long, device=dev),
              "pixel_values": torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(
                  dev, pair.torch_dtype(cfg))}

    def make_ref(cache, new_tokens=m):
      kw = {} if cache == "dynamic" else {"cache_implementation": cache}

      def ref():
        with torch.inference_mode():
          out = ref_model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens,
                                   pad_token_id=0, eos_token_id=1, **kw)
        return out[:, ids.shape[1]:].cpu().numpy()
      return ref

    attns = ("eager", "sdpa") if args.hf_attn == "auto" else (args.hf_attn,)
    caches = ("dynamic", "static") if args.hf_cache == "auto" else (args.hf_cache,)
    best = None
    for attn in attns:
      ref_model.set_attn_implementation(attn)
      for cache in caches:
        run = make_ref(cache)
        times = pair.interleaved({"ref": run}, args.warmup + 1, lambda x: x)["ref"]
        print(f"ref warm-up attn={attn} cache={cache}: {', '.join(f'{x:.2f}' for x in times)} s",
              flush=True)
        if best is None or min(times) < best[0]:
          best = (min(times), attn, cache, run)
    ref_model.set_attn_implementation(best[1])
    fns["ref"] = best[3]
    fns["ref_1"] = make_ref(best[2], 1)
    ref_tokens = best[3]()
    ours_tokens = our_out.tokens
    # Compare up to each row's EOS in the reference (both pad with 0 after EOS).
    result.update(hf_attn=best[1], hf_cache=best[2],
                  tokens_equal_fraction=round(float(np.mean(ours_tokens == ref_tokens)), 4),
                  rows_equal=int(np.sum(np.all(ours_tokens == ref_tokens, axis=1))))
  fns["ours_1"] = lambda: ours(1)
  for _ in range(args.warmup):
    ours()
    ours(1)
  # Every decoding step reads all the LLM's weights (the tied [vocab, width] table included,
  # for the logits): the weight bytes / step time is each side's effective read bandwidth,
  # compared with a plain read (a jitted sum over 256 MiB float32) timed between the runs.
  llm_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["llm"]))
  big = jax.numpy.ones((64 << 20,), jax.numpy.float32)
  read_all = jax.jit(jax.numpy.sum)
  jax.block_until_ready(read_all(big))
  fns["bandwidth"] = lambda: jax.block_until_ready(read_all(big))

  # "X_1" generate one token (image + prefill + the first token): the difference to the
  # 32-token call is the time of the m - 1 decoding steps after prefill.
  times = pair.interleaved(fns, args.runs, lambda x: x)
  med = {k: pair.median(v) for k, v in times.items()}
  bandwidth = big.nbytes / med.pop("bandwidth")
  decode_tokens = b * (m - 1)

  def per_decode(dt: float, value: float) -> float | None:
    """value / dt for the m - 1 tokens after the first; None when the 1-token call was not
    faster than the m-token one (timing noise, e.g. a tiny model with few new tokens)."""
    return round(value / dt, 4) if dt > 0 else None
  ours_dec = med["ours"] - med["ours_1"]
  result = {"bench": "decode", "device": args.device, "batch_size": b, "prompt_len": PROMPT_LEN,
            "new_tokens": m, "vocab": pair.vocab_size(cfg), "llm_width": llm_width(cfg),
            "ours_s": round(med["ours"], 4),
            "ours_runs_s": [round(x, 3) for x in times["ours"]],
            "ours_prefill_s": round(med["ours_1"], 4),
            "ours_tok_s": round(b * m / med["ours"], 2),
            "ours_decode_tok_s": per_decode(ours_dec, decode_tokens),
            "ours_steps": our_out.steps, "compile_s": round(compile_s, 1),
            "llm_weight_gb": round(llm_bytes / 1e9, 3),
            "read_gb_per_s": round(bandwidth / 1e9, 2),
            "ours_step_s": round(ours_dec / (m - 1), 4),
            "ours_weight_gb_per_s": per_decode(ours_dec, llm_bytes * (m - 1) / 1e9), **result}
  if "ref" in times:
    ref_dec = med["ref"] - med["ref_1"]
    result.update(
        ref_s=round(med["ref"], 4), ref_runs_s=[round(x, 3) for x in times["ref"]],
        ref_prefill_s=round(med["ref_1"], 4), ref_tok_s=round(b * m / med["ref"], 2),
        ref_decode_tok_s=per_decode(ref_dec, decode_tokens),
        ratio=round(ref_dec / ours_dec, 3) if ref_dec > 0 and ours_dec > 0 else None,
        ratio_end_to_end=round(med["ref"] / med["ours"], 3),
        ratio_end_to_end_paired=round(pair.paired_ratio(times["ref"], times["ours"]), 3),
        ratio_prefill=round(med["ref_1"] / med["ours_1"], 3),
        ref_step_s=round(ref_dec / (m - 1), 4),
        ref_weight_gb_per_s=per_decode(ref_dec, llm_bytes * (m - 1) / 1e9))
  if args.profile:
    try:
      result["profile"] = profile_decode(decoder, ours, m, args.profile)
    except Exception as e:  # pylint: disable=broad-except  (the timings above still count)
      result["profile_error"] = f"{type(e).__name__}: {e}"
      print(f"--profile failed: {result['profile_error']}", file=sys.stderr, flush=True)
  result["machine"] = pair.machine_info()
  print(f"ours {med['ours']:.3f} s end to end, {result['ours_decode_tok_s']} tok/s after "
        "prefill" + (f"; transformers {med['ref']:.3f} s, {result['ref_decode_tok_s']} "
                     f"tok/s ({result['hf_attn']}, {result['hf_cache']} cache); ratio "
                     f"{result['ratio']}x after prefill, {result['ratio_end_to_end']:.2f}x "
                     "end to end" if "ref" in times else ""), flush=True)
  print(json.dumps(result))


def llm_width(cfg) -> int:
  from big_vision_lite.models import paligemma  # pylint: disable=g-import-not-at-top
  return paligemma.resolve_config(cfg)["llm"]["width"]


def profile_decode(decoder, ours, new_tokens: int, folder: str) -> dict:
  """xprof.profile of one `new_tokens` call; each op also gets its seconds per decoding step
  (ops inside the loop run once per step after the first token, or a multiple of that)."""
  compiled = {}
  make_fn = decoder._fn  # pylint: disable=protected-access

  def spy(st):  # The HLO of exactly the executable that decode() runs.
    fn = make_fn(st)

    def call(*args):
      compiled.setdefault("hlo", fn.lower(*args).compile().as_text())
      return fn(*args)
    return call
  decoder._fn = spy  # pylint: disable=protected-access
  try:
    ours()
  finally:
    decoder._fn = make_fn  # pylint: disable=protected-access
  prof = xprof.profile(ours, lambda x: x, compiled["hlo"], folder, top=16)
  steps = new_tokens - 1
  for op in prof["ops"]:
    if steps and op["calls"] >= steps and op["calls"] % steps == 0:
      op["ms_per_step"] = round(op["s"] / steps * 1e3, 2)
  prof["steps"] = steps
  return prof


if __name__ == "__main__":
  main()
