"""Decoding: greedy == the references' stored / live generations, beam == exhaustive search,
sampling distributions, logit masks, EOS bookkeeping, mesh == no mesh, predict_fn.

References: the big_vision and transformers fixtures (tokens exact, log-probs 1e-4); for a
tiny random model (vocab 12, 3 steps) a table of the teacher-forced (uncached) forward's
logits for every possible continuation, from which greedy, beam and exhaustive answers are
computed in numpy.
Compiles use XLA optimisation level 0 (same program, ~3x faster to compile on CPU).
"""
import itertools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import big_vision_lite
from big_vision_lite import checkpoints, decode, sharding
from big_vision_lite import tokenizer as tk
from big_vision_lite.models import paligemma

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
PG2_CAPS = {"query_pre_attn_norm": "rsqrt_emb_per_head", "attn_logits_softcap": 2.5,
            "final_logits_softcap": 5.0}
HF_IMAGE_TOKENS = {"hf_paligemma1_tiny": 4, "hf_paligemma2_tiny": 9}


def log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def picked(table, tokens):
  return np.take_along_axis(table, np.asarray(tokens)[..., None], -1)[..., 0]


# ------------------------------------------------------------------------ reference fixtures


@pytest.fixture(scope="module")
def hf(fixtures_dir):
  """folder -> (config, params, images NHWC, prompts without image tokens, io)."""
  cache = {}

  def get(folder):
    if folder not in cache:
      config, params = checkpoints.load(fixtures_dir / folder)
      io = np.load(fixtures_dir / folder / "io.npz")
      n_img = HF_IMAGE_TOKENS[folder]
      prompts = [ids[mask == 1][n_img:].tolist()
                 for ids, mask in zip(io["gen_input_ids"], io["gen_attention_mask"])]
      cache[folder] = config, params, io["pixel_values"].transpose(0, 2, 3, 1), prompts, io
    return cache[folder]

  return get


@pytest.mark.parametrize("folder", ["hf_paligemma1_tiny", "hf_paligemma2_tiny"])
def test_greedy_equals_transformers_generate(hf, folder):
  config, params, images, prompts, io = hf(folder)
  assert [len(p) for p in prompts] == (io["prompt_len"] - HF_IMAGE_TOKENS[folder]).tolist()
  out = decode.Decoder(config, compiler_options=FAST).decode(params, images, prompts,
                                                             max_decode_len=10)
  np.testing.assert_array_equal(out.tokens, io["generated_tokens"])
  want = picked(log_softmax(io["generate_scores"]), io["generated_tokens"])
  np.testing.assert_allclose(out.logp, want, atol=1e-4)
  np.testing.assert_allclose(out.scores, want.sum(1), atol=1e-3)
  assert out.steps == 10 and not out.finished.any() and (out.lengths == 10).all()


@pytest.mark.parametrize("fixture,overrides,ref", [
    ("bv_paligemma1_tiny", {}, "decode_tokens"),
    ("bv_paligemma1_tiny", {"cache_dtype": "bfloat16"}, "decode_tokens_bf16cache"),
    ("bv_paligemma2_tiny", PG2_CAPS, "decode_tokens")])
def test_greedy_equals_big_vision_decode(fixtures_dir, fixture, overrides, ref):
  config, params = checkpoints.load(fixtures_dir / fixture / "params.npz", llm=overrides)
  io = np.load(fixtures_dir / fixture / "io.npz")
  prompts = [row[:n].tolist() for row, n in zip(io["prompt"], io["prompt_len"])]
  decoder = decode.Decoder(config, compiler_options=FAST)
  out = decoder.decode(params, io["image"], prompts, max_decode_len=10)
  np.testing.assert_array_equal(out.tokens, io[ref])
  if fixture == "bv_paligemma2_tiny":  # Our logits are capped at every step (see README).
    want = picked(log_softmax(np.tanh(io["greedy_step_logits"] / 5) * 5), io[ref])
  else:
    want = io["decode_logp"]
  np.testing.assert_allclose(out.logp, want, atol=1e-4 if "cache_dtype" not in overrides else 2e-2)


def test_greedy_equals_live_transformers_with_padding(hf, fixtures_dir):
  """A new batch (ragged prompts, left-padded for HF), 8 tokens, window 8 in play."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  folder = "hf_paligemma2_tiny"
  config, params, _, _, _ = hf(folder)
  rs = np.random.RandomState(1)
  n_img, lengths = HF_IMAGE_TOKENS[folder], [3, 14, 8, 1]
  prompts = [[2, *rs.randint(3, 256, n).tolist(), 108] for n in lengths]
  images = rs.uniform(-1, 1, (len(prompts), 42, 42, 3)).astype(np.float32)
  width = n_img + max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), width), np.int64)
  attention = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - n_img - len(p):] = [1408] * n_img + p
    attention[i, width - n_img - len(p):] = 1
  model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
      str(fixtures_dir / folder), attn_implementation="eager").eval()
  with torch.no_grad():
    gen = model.generate(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention),
        token_type_ids=torch.zeros_like(torch.from_numpy(ids)),
        pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), do_sample=False,
        max_new_tokens=8, pad_token_id=0, eos_token_id=1, output_scores=True,
        return_dict_in_generate=True)
  want = gen.sequences[:, width:].numpy()
  hf_logp = picked(log_softmax(torch.stack(gen.scores, 1).numpy()), want)
  out = decode.Decoder(config, compiler_options=FAST).decode(params, images, prompts,
                                                             max_decode_len=8)
  for i in range(len(prompts)):  # HF pads after EOS with 0, as we do.
    n = out.lengths[i] + out.finished[i]
    np.testing.assert_array_equal(out.tokens[i], want[i])
    np.testing.assert_allclose(out.logp[i, :n], hf_logp[i, :n], atol=1e-4)


# ---------------------------------------------------------------------- tiny exhaustive model

TINY = {"img": {"patch_size": [14, 14], "image_size": 28, "width": 16, "depth": 1, "mlp_dim": 32,
                "num_heads": 2, "head_zeroinit": False},
        "llm": {"vocab_size": 12, "width": 16, "depth": 2, "mlp_dim": 32, "num_heads": 2,
                "num_kv_heads": 1, "head_dim": 8, "final_logits_softcap": 5.0,
                "post_norms": True, "sliding_window": 4}}
V, M, EOS = 12, 3, 1
SEED, EMBED_STD = 31, 2.0
TINY_PROMPTS = [[2, 5, 7, 3, 11], [2, 9, 4, 4, 6, 3, 8, 11], [2, 11]]


def random_params(cfg, seed, embed_std):
  """Random weights in numpy (compiling flax's init costs tens of seconds on a busy CPU)."""
  model = paligemma.Model(**cfg)
  size = cfg["img"]["image_size"]
  text = np.zeros((1, 4), np.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, size, size, 3)), text,
                          text)["params"]
  rs = np.random.RandomState(seed)

  def one(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    std = (embed_std if name.endswith("input_embedding") else
           0.1 if name.endswith(("scale", "bias")) else 0.2)
    return (std * rs.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, shapes)


class Entry(dict):
  """prefix tuple -> float64[V] next-token logits; .logp(prefix) memoises log_softmax."""

  def logp(self, prefix):
    if not hasattr(self, "_logp"):
      self._logp = {}
    if prefix not in self._logp:
      self._logp[prefix] = log_softmax(self[prefix])
    return self._logp[prefix]


@pytest.fixture(scope="module")
def tiny():
  """(params, images, table): table[b][prefix tuple] = float64[V] logits of the next token,
  from one teacher-forced forward over every 2-token continuation of every prompt."""
  model = paligemma.Model(**TINY)
  rs = np.random.RandomState(0)
  images = rs.uniform(-1, 1, (len(TINY_PROMPTS), 28, 28, 3)).astype(np.float32)
  # Seed and scale chosen so that the beam-search winners have lengths 1, 2 and 3.
  params = random_params(TINY, SEED, EMBED_STD)
  t = max(len(p) for p in TINY_PROMPTS)
  pairs = list(itertools.product(range(V), repeat=2))
  text, mask, mask_ar, image_rows = [], [], [], []
  for b, p in enumerate(TINY_PROMPTS):
    for a, c in pairs:  # The prompt, padding (not attended), then the continuation a, c.
      text.append(p + [0] * (t - len(p)) + [a, c])
      mask.append([1] * len(p) + [0] * (t - len(p)) + [1, 1])
      mask_ar.append([0] * t + [1, 1])
      image_rows.append(images[b])
  forward = jax.jit(model.apply, compiler_options=FAST)
  logits, _ = forward({"params": params}, np.stack(image_rows), np.array(text),
                      np.array(mask_ar), np.array(mask, bool))
  logits = np.asarray(logits, np.float64).reshape(len(TINY_PROMPTS), V, V, t + 2, V)
  table = []
  for b, p in enumerate(TINY_PROMPTS):
    entry = Entry({(): logits[b, 0, 0, len(p) - 1]})
    for a in range(V):
      entry[(a,)] = logits[b, a, 0, t]
      for c in range(V):
        entry[(a, c)] = logits[b, a, c, t + 1]
    table.append(entry)
  return params, images, table


def tiny_decoder(mesh=None, **kw):
  return decode.Decoder(TINY, mesh=mesh, compiler_options=FAST, **kw)


def lp_norm(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


def seq_logp(entry, seq):
  return [entry.logp(seq[:i])[t] for i, t in enumerate(seq)]


def exhaustive_ranking(entry, alpha):
  """Every complete sequence (ended by EOS, or M tokens long), best first, as (score, seq)."""
  others = [t for t in range(V) if t != EOS]
  seqs = [s + (EOS,) for n in range(M) for s in itertools.product(others, repeat=n)]
  seqs += list(itertools.product(others, repeat=M))
  return sorted(((sum(seq_logp(entry, s)) / lp_norm(len(s), alpha), s) for s in seqs),
                reverse=True)


def reference_beam(entry, n, alpha):
  """decode_beam.py's algorithm in plain Python over the table: (score, seq, steps), steps =
  when its early stop fires (the best finished beats any live hypothesis' best future)."""
  live, fin, steps = [(0.0, ())], [], None
  for i in range(M):
    cands = []
    for s, seq in live:
      logp = entry.logp(seq)
      fin.append(((s + logp[EOS]) / lp_norm(i + 1, alpha), seq + (EOS,)))
      cands += [(s + logp[t], seq + (t,)) for t in range(V) if t != EOS]
    live = sorted(cands, key=lambda c: -c[0])[:n]
    fin = sorted(fin, key=lambda c: -c[0])[:n]
    bound = live[0][0] / max(lp_norm(i + 2, alpha), lp_norm(M, alpha))
    if steps is None and (fin[0][0] >= bound or i + 1 == M):
      steps = i + 1
  best = max(fin + [(s / lp_norm(M, alpha), seq) for s, seq in live], key=lambda c: c[0])
  return (*best, steps)


def as_tuple(row):
  row = list(row)
  return tuple(row[:row.index(EOS) + 1] if EOS in row else row)


ALPHAS = [0.0, 1.0, 3.0, -2.0]  # -2 favours short sequences: the early stop fires.


def test_beam_search_equals_exhaustive_search(tiny):
  params, images, table = tiny
  decoder = tiny_decoder()
  lengths, steps = set(), {}
  for alpha in ALPHAS:
    # (V - 1) ** (M - 1) live hypotheses keep every prefix, so the search is exact.
    out = decoder.decode(params, images, TINY_PROMPTS, max_decode_len=M,
                         beam_size=(V - 1) ** (M - 1), length_penalty=alpha)
    for b, entry in enumerate(table):
      ranked = exhaustive_ranking(entry, alpha)
      assert ranked[0][0] - ranked[1][0] > 1e-3  # No near-tie: the comparison is meaningful.
      best = ranked[0][1]
      assert as_tuple(out.tokens[b]) == best, (alpha, b, ranked[:3])
      np.testing.assert_allclose(out.logp[b, :len(best)], seq_logp(entry, best), atol=1e-4)
      assert out.finished[b] == (best[-1] == EOS) and out.lengths[b] == len(best) - out.finished[b]
      lengths.add(len(best))
    n = (V - 1) ** (M - 1)
    assert out.steps == max(reference_beam(entry, n, alpha)[2] for entry in table)
    steps[alpha] = out.steps
  assert lengths == {1, 2, 3}  # EOS termination and the length penalty both matter here.
  assert min(steps.values()) < M  # Some setting stopped early.
  assert decoder.trace_count == 1  # The length penalty is not a compile-time constant.


def test_sharded_beam_search_equals_reference(tiny):
  """Small beam under a mesh (params FSDP-sharded, 3 rows padded to the 8 data shards)."""
  params, images, table = tiny
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  decoder = tiny_decoder(mesh)
  params = jax.device_put(params, sharding.infer_shardings(params, sharding.FSDP_RULES, mesh))
  for alpha in (0.0, 3.0, -2.0):
    out = decoder.decode(params, images, TINY_PROMPTS, max_decode_len=M, beam_size=2,
                         length_penalty=alpha)
    refs = [reference_beam(entry, 2, alpha) for entry in table]
    assert [as_tuple(row) for row in out.tokens[:3]] == [ref[1] for ref in refs]
    assert out.steps == max(ref[2] for ref in refs)


def test_greedy_with_masks_logits_fn_and_eos(tiny):
  """allowed_tokens + forbidden_tokens + a logits_fn that sees earlier tokens; forced EOS
  ends rows at different steps and the loop before max_decode_len."""
  params, images, table = tiny
  # Token 11 is every example's unmasked first choice, 0 and 4 the next ones.
  assert all(np.argsort(entry[()])[-1] == 11 for entry in table)
  allowed, forbidden = np.arange(V) != 11, [0, 7]
  penalty, eos_at = 2.0, np.array([2, 1, 2])

  def logits_fn(logits, tokens, step):
    """Discourages repeats; EOS exactly at each row's eos_at (ends rows at other steps)."""
    prev = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(step - 1, 0), 1, keepdims=False)
    logits = logits - penalty * (step > 0) * jax.nn.one_hot(prev, V)
    eos = jnp.where(step == eos_at, 50.0, -jnp.inf)[:, None]
    return jnp.where((jnp.arange(V) == EOS)[None], eos, logits)

  out = tiny_decoder().decode(params, images, TINY_PROMPTS, max_decode_len=M + 1,
                              allowed_tokens=allowed, forbidden_tokens=forbidden,
                              logits_fn=logits_fn)
  for b, entry in enumerate(table):
    seq, logps = (), []
    for i in range(eos_at[b] + 1):
      z = entry[seq].copy()
      if i:
        z[seq[-1]] -= penalty
      z[EOS] = 50.0 if i == eos_at[b] else -np.inf
      z[~allowed] = z[forbidden] = -np.inf
      top2 = np.sort(z)[-2:]
      assert top2[1] - top2[0] > 1e-3
      seq += (int(np.argmax(z)),)
      logps.append(log_softmax(z)[seq[-1]])
    assert seq[-1] == EOS and set(seq[:-1]).isdisjoint([EOS, 11, *forbidden])
    np.testing.assert_array_equal(out.tokens[b], list(seq) + [0] * (M + 1 - len(seq)))
    np.testing.assert_allclose(out.logp[b, :len(seq)], logps, atol=1e-4)
    assert (out.logp[b, len(seq):] == 0).all()
  np.testing.assert_array_equal(out.lengths, eos_at)
  assert out.finished.all() and out.steps == 3  # Not M + 1: every row was done.
  np.testing.assert_allclose(out.scores, out.logp.sum(1))


def sample_probs(logits, temperature, top_k, top_p):
  """HF-style warpers in numpy: temperature, top-k, then top-p on the renormalised rest."""
  z = logits / temperature
  z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p)
  before = np.cumsum(p[order]) - p[order]
  keep = np.zeros(len(p), bool)
  keep[order[before < top_p]] = True
  p = np.where(keep, p, 0.0)
  return p / p.sum()


def test_sampling_follows_temperature_top_k_top_p(tiny):
  params, images, table = tiny
  reps, kw = 600, dict(temperature=0.7, top_k=6, top_p=0.7)
  rows_images = np.repeat(images, reps, axis=0)
  rows_prompts = [p for p in TINY_PROMPTS for _ in range(reps)]
  decoder = tiny_decoder()
  run = lambda rng, sampler="sample": decoder.decode(
      params, rows_images, rows_prompts, max_decode_len=M, sampler=sampler, rng=rng, **kw)
  out = run(jax.random.key(3))
  kept_sizes = []
  for b, entry in enumerate(table):
    rows = slice(b * reps, (b + 1) * reps)
    want = sample_probs(entry[()], **kw)
    kept_sizes.append(int((want > 0).sum()))
    freq = np.bincount(out.tokens[rows, 0], minlength=V) / reps
    assert (freq[want == 0] == 0).all(), (b, freq, want)
    assert (np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / reps)).all(), (b, freq, want)
    # Reported log-probs are the model's own (not the tempered / truncated ones).
    first = out.tokens[rows, 0]
    np.testing.assert_allclose(out.logp[rows, 0], entry.logp(())[first], atol=1e-4)
    second = np.array([entry.logp((a,))[c] for a, c in out.tokens[rows, :2]])
    live = first != EOS
    np.testing.assert_allclose(out.logp[rows, 1][live], second[live], atol=1e-4)
  assert 1 < min(kept_sizes) and max(kept_sizes) < kw["top_k"]  # top-p cut inside the top-k
  np.testing.assert_array_equal(run(jax.random.key(3)).tokens, out.tokens)
  assert (run(jax.random.key(4)).tokens != out.tokens).any()
  # big_vision's sampler strings: "nucleus(p)" sets top_p (same compiled function here).
  nucleus = run(jax.random.key(3), sampler="nucleus(0.7)")
  np.testing.assert_array_equal(nucleus.tokens, out.tokens)
  assert decoder.trace_count == 1


def greedy_reference(entry):
  seq = ()
  while len(seq) < M and (not seq or seq[-1] != EOS):
    seq += (int(np.argmax(entry[seq])),)
  return seq


def test_generate_entry_point_and_prompt_buckets(tiny):
  params, images, table = tiny
  got, scores = big_vision_lite.generate(TINY, params, images, TINY_PROMPTS, max_decode_len=M,
                                         return_scores=True)
  want = [greedy_reference(entry) for entry in table]
  assert got == [[t for t in w if t != EOS] for w in want]
  np.testing.assert_allclose(scores, [sum(seq_logp(e, w)) for e, w in zip(table, want)],
                             atol=1e-4)
  decoder = decode.get_decoder(TINY)
  assert decoder.trace_count == 1
  # Other prompt lengths within the same 16-token bucket reuse the compiled loop.
  other = [[2, 11], [2, 3, 4, 5, 6, 7, 8, 9, 10, 3, 4, 5, 11], [2, 7, 11]]
  assert len(big_vision_lite.generate(TINY, params, images, other, max_decode_len=M)) == 3
  assert decode.get_decoder(dict(TINY)) is decoder and decoder.trace_count == 1


def test_sharded_greedy_equals_transformers(hf):
  """Params FSDP-sharded by sharding.py, batch over "data" (3 rows padded to 4)."""
  config, params, images, prompts, io = hf("hf_paligemma2_tiny")
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  params = jax.device_put(params, sharding.infer_shardings(params, sharding.FSDP_RULES, mesh))
  assert params["llm"]["embedder"]["input_embedding"].sharding.spec == P("fsdp", None)
  decoder = decode.Decoder(config, mesh=mesh, data_axes=("data",), compiler_options=FAST)
  out = decoder.decode(params, images, prompts, max_decode_len=10)
  np.testing.assert_array_equal(out.tokens, io["generated_tokens"])
  want = picked(log_softmax(io["generate_scores"]), io["generated_tokens"])
  np.testing.assert_allclose(out.logp, want, atol=1e-4)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  sentences = ["a cat sits on the mat", "two dogs play in the park", "what is in the image?",
               "caption en", "detect cat ; dog", "the quick brown fox jumps"] * 20
  return tk.Tokenizer(tk.train_sentencepiece(
      sentences, tmp_path_factory.mktemp("spm") / "tiny.model", vocab_size=320))


def test_make_predict_fn(spm):
  cfg = {"img": TINY["img"], "llm": {**TINY["llm"], "vocab_size": spm.vocab_size}}
  rs = np.random.RandomState(2)
  images = rs.uniform(-1, 1, (4, 28, 28, 3)).astype(np.float32)
  params = random_params(cfg, 1, EMBED_STD)
  prefixes = ["caption en", "detect cat ; dog", "what is in the image?", "a"]
  examples = [{"id": i, "image": images[i], "prefix": p} for i, p in enumerate(prefixes)]
  decoder = decode.Decoder(cfg, compiler_options=FAST)
  predict_fn = decode.make_predict_fn(decoder, params, spm, max_decode_len=6, batch_size=3)
  texts = predict_fn(examples)  # Two calls: 3 examples, then 1 padded to 3.
  sep = spm.encode("\n")
  assert sep != [108]  # This tokenizer's "\n" is another id: the prompt must not hard-code it.
  prompts = [[spm.bos_id, *spm.encode(p), *sep] for p in prefixes]
  want = decoder.generate(params, images[:3], prompts[:3], max_decode_len=6, eos_id=spm.eos_id)
  want += decoder.generate(params, images[[3, 3, 3]], prompts[3:] * 3, max_decode_len=6,
                           eos_id=spm.eos_id)[:1]
  assert texts == [spm.decode(w) for w in want]
  assert any(texts) and decoder.trace_count == 1
  assert predict_fn([]) == []
  with pytest.raises(KeyError, match="needs 'image' and 'prefix'"):
    predict_fn([{"id": 7, "image": images[0]}])


def test_sampler_strings():
  assert decode.parse_sampler("greedy") == ("greedy", {})
  assert decode.parse_sampler("nucleus(0.9)") == ("sample", {"top_p": 0.9})
  assert decode.parse_sampler("temperature(t=0.5)") == ("sample", {"temperature": 0.5})
  with pytest.raises(ValueError, match="sampler='topk'"):
    decode.parse_sampler("topk")
  with pytest.raises(ValueError, match="'1.2.3' is not a number"):
    decode.parse_sampler("nucleus(1.2.3)")


@pytest.mark.parametrize("change,match", [
    (dict(prompts=TINY_PROMPTS[:2]), "got 2 prompts for 3 images"),
    (dict(prompts=[[2, 99], [2], [2]]), r"prompts\[0\]: token ids must be in \[0, 12\)"),
    (dict(prompts=[[], [2], [2]]), r"prompts\[0\]: expected a non-empty list"),
    (dict(images=np.zeros((3, 28, 28))), r"images: expected float32\[B,H,W,3\]"),
    (dict(max_decode_len=0), "max_decode_len=0"),
    (dict(sampler="sample"), "pass rng="),
    (dict(sampler="sample", beam_size=2, rng=jax.random.key(0)), "beam search is deterministic"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_k=13), "top_k=13"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(allowed_tokens=np.ones(5, bool)), r"allowed_tokens: expected bool\[12\]"),
    (dict(forbidden_tokens=[12]), r"forbidden_tokens: ids must be in \[0, 12\)"),
    (dict(forbidden_tokens=list(range(12))), "leave no token"),
    (dict(logits_fn="argmax"), "logits_fn must be callable"),
    (dict(length_penalty="gnmt"), "length_penalty='gnmt'"),
    (dict(sampler="nucleus(0.9)", top_p=0.5, rng=jax.random.key(0)), "sets top_p=0.9 but"),
])
def test_bad_arguments_raise_clear_errors(change, match):
  args = dict(images=np.zeros((3, 28, 28, 3), np.float32), prompts=TINY_PROMPTS, max_decode_len=3)
  args.update(change)
  decoder = tiny_decoder()
  with pytest.raises((ValueError, TypeError), match=match):
    decoder.decode({}, args.pop("images"), args.pop("prompts"), **args)
  assert decoder.trace_count == 0  # Rejected before anything was compiled.
