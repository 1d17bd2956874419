"""EvalRunner: config.evals -> evaluators on the demo data, predictions identical to direct
decoding, a scripted model whose output is known (perfect VQA / detection / segmentation
boxes), outputs (predictions.jsonl layout, rendered images), schedule and config errors.

Also holds the tiny-model helpers the evaluate.py / predict.py tests import.
"""
import json
import math
import os
import shutil

import ml_collections
import numpy as np
import pytest

from big_vision_lite import checkpoints
from big_vision_lite import decode
from big_vision_lite import eval_runner
from big_vision_lite import tokenizer as tok_lib
from big_vision_lite.data import demo
from big_vision_lite.data import pipeline
from big_vision_lite.evaluators import caption
from big_vision_lite.models import vqvae

RES = 16
TEXT_LEN = 24


def tiny_model(vocab_size: int) -> dict:
  return {"img": dict(patch_size=(8, 8), width=16, depth=1, mlp_dim=32, num_heads=2,
                      image_size=RES, head_zeroinit=False),
          "llm": dict(vocab_size=vocab_size, width=32, depth=2, mlp_dim=48, num_heads=2,
                      num_kv_heads=1, head_dim=8)}


def random_params(model_config: dict, seed: int = 0, scale: float = 0.3) -> dict:
  """float32 params drawn with numpy from the checkpoint shape table (nothing to compile)."""
  rng = np.random.RandomState(seed)
  return checkpoints.unflatten({
      name: (scale * rng.randn(*shape)).astype(np.float32)
      for name, shape in sorted(checkpoints.param_shapes(model_config).items())})


def scripted_params(model_config: dict, start: int, chain: list[int], seed: int = 0) -> dict:
  """Params whose greedy decoding after a prompt ending in `start` emits exactly `chain`.

  Every layer's output projection is zero, so the residual stream is the current token's
  embedding and the (tied) logits are <normed E[t], E[j]>: a bigram model. Chain token k gets
  E = 2.5**k * (e_k + e_{k+1}) on fresh basis vectors: its successor scores 2.5**(k+1), more
  than itself (2 * 2.5**k); all other tokens have tiny random embeddings.
  """
  seq = [start, *chain]
  d = model_config["llm"]["width"]
  if len(set(seq)) != len(seq) or len(seq) + 1 > d:
    raise ValueError(f"scripted chain needs distinct tokens and width > {len(seq)}: {seq}")
  params = random_params(model_config, seed, scale=0.02)
  llm = params["llm"]
  llm["layers"]["attn"]["attn_vec_einsum"]["w"][:] = 0
  llm["layers"]["mlp"]["linear"][:] = 0
  llm["final_norm"]["scale"][:] = 0  # (1 + scale) = 1: the normed direction is kept.
  emb = llm["embedder"]["input_embedding"]
  emb *= 0.05
  for k, t in enumerate(seq):
    emb[t] = 0
    emb[t, k] = emb[t, k + 1] = 2.5 ** k
  return params


def write_workdir(path, model_config: dict, params: dict, *, tokenizer_file: str,
                  vqvae_path=None, step: int = 3) -> str:
  """A training workdir as train.py leaves it: config.json, one orbax step, the cached demo
  tokenizer."""
  from big_vision_lite import run_state  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  run_state.write_config(path, {"model": model_config, "lora": None, "tokenizer": "demo",
                                "vqvae": vqvae_path, "config": {}})
  with run_state.RunState(path) as mgr:
    mgr.save(step, {"params": params})
  shutil.copy(tokenizer_file, path)
  return str(path)


def write_vqvae(path: str) -> str:
  cfg = vqvae.VQVAEConfig(code_dim=32, enc_channels=(8, 16, 16, 32), enc_res_hidden=32,
                          dec_width=32, dec_res_hidden=32, dec_channels=(32, 16, 16, 8))
  vqvae.save(path, cfg, vqvae.init_params(cfg, 0))
  return path


def demo_eval(kind: str, split: str, *, train: bool = False, **kw) -> dict:
  task = {"caption": "caption", "vqa": "vqa", "detection": "detect",
          "segmentation": "segment", "perplexity": "caption"}[kind]
  entry = dict(type=kind, data=dict(name="demo", split=split, image_size=RES),
               pp=demo.demo_pp(task, image_size=RES, text_len=TEXT_LEN,
                               train=train or kind == "perplexity"), batch_size=4, **kw)
  if kind != "perplexity":
    entry.setdefault("max_decode_len", 24)  # One decode compilation for every test.
  if kind == "caption":
    entry.setdefault("tokenizer", "python")  # PTB tokenisation without starting Java.
  return entry


def make_config(evals: dict, vqvae_path=None, **kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.eval_steps = 10
  c.vqvae = vqvae_path
  c.render_predictions = 2
  c.evals = evals
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("runner")
  tok = demo.demo_tokenizer(str(tmp))
  return {"tok": tok, "model": tiny_model(tok.vocab_size), "tmp": tmp,
          "vq": write_vqvae(str(tmp / "vq.npz"))}


def _chain(tok, text):
  return tok.encode(text) + [tok.eos_id]


def test_predictions_equal_direct_decoding_and_metrics_match(env):
  tok, model = env["tok"], env["model"]
  params = random_params(model, 1)
  cfg = make_config({"cap": demo_eval("caption", "val[:5]")})
  runner = eval_runner.EvalRunner(cfg, tokenizer=tok, model_config=model)
  seen = []
  metrics = runner.run(params, step=7, progress=lambda *a: seen.append(a))
  assert seen == [("cap", 0, 5), ("cap", 4, 5), ("cap", 5, 5)]
  assert set(metrics) == {"cap/cider", "cap/bleu-4", "cap/rouge-l"}
  recs = runner.predictions["cap"]
  assert [r["id"] for r in recs] == [0, 1, 2, 3, 4]
  # The same examples decoded directly, in one batch.
  exs = list(pipeline.eval_examples(cfg.evals.cap.data.to_dict(), cfg.evals.cap.pp,
                                    tokenizer=tok))
  prompts = [[tok.bos_id, *tok.encode(e["prefix"]), *tok.encode("\n")] for e in exs]
  direct = decode.generate(model, params, np.stack([e["image"] for e in exs]), prompts,
                           max_decode_len=24)
  assert [r["prediction"] for r in recs] == [tok.decode(t) for t in direct]
  for r, e in zip(recs, exs):
    assert r["prefix"] == "caption en" and r["captions"] == list(e["captions"])
    assert list(r)[:3] == ["id", "prefix", "prediction"]
  refs = {i: r["captions"] for i, r in enumerate(recs)}
  preds = {i: r["prediction"] for i, r in enumerate(recs)}
  want = caption.caption_scores(refs, preds, metrics=("cider", "bleu-4", "rouge-l"),
                                tokenizer="python")
  assert metrics == pytest.approx({f"cap/{k}": v for k, v in want.items()})
  assert runner.steps == {"cap": 7} and runner.final_metrics() == metrics


def test_scripted_model_scores_perfectly(env):
  tok, model = env["tok"], env["model"]
  example = demo.DemoSource("val", image_size=RES)[3]  # One diamond; answer "diamond".
  box, label = example["objects"]["bbox"][0], example["objects"]["label"][0]
  sep = tok.encode("\n")[-1]
  cfg = make_config({"vqa": demo_eval("vqa", "val[3:4]"),
                     "det": demo_eval("detection", "val[3:4]"),
                     "seg": demo_eval("segmentation", "val[3:4]")},
                    vqvae_path=env["vq"])
  runner = eval_runner.EvalRunner(cfg, tokenizer=tok, model_config=model)

  answer = scripted_params(model, sep, _chain(tok, example["answers"][0]))
  m = runner.run(answer, names=["vqa"])
  assert runner.predictions["vqa"][0]["prediction"] == "diamond"
  # VQAv2 accuracy is min(1, matching answers / 3): the demo gives one reference answer.
  assert m["vqa/exact_match"] == 1.0 and m["vqa/vqa_accuracy"] == pytest.approx(1 / 3)

  det_text = tok_lib.objects_to_text([box], [label])
  m = runner.run(scripted_params(model, sep, _chain(tok, det_text)), names=["det"])
  assert runner.predictions["det"][0]["prediction"] == det_text
  assert m["det/map"] == pytest.approx(1.0) and m["det/invalid_rate"] == 0.0

  codes = np.arange(16) * 7 + 3  # Distinct codes: every chain token must differ.
  seg_text = tok_lib.objects_to_text([box], [label], seg_codes=[codes])
  m = runner.run(scripted_params(model, sep, _chain(tok, seg_text)), names=["seg"])
  rec = runner.predictions["seg"][0]
  assert rec["prediction"] == seg_text and rec["valid"]
  assert m["seg/box_acc@0.75"] == 1.0 and m["seg/invalid_rate"] == 0.0
  # The mask the evaluator scored: decoded with config.vqvae, pasted into the box.
  _, vq = vqvae.load(env["vq"])
  logits = np.asarray(vqvae.decode(vq, codes[None].astype(np.int32)))[0]
  pbox = [int(v * RES) for v in tok_lib.parse_objects(seg_text)[0].box]
  mask = vqvae.mask_in_box(logits, pbox, (RES, RES))
  gt = example["objects"]["mask"][0]
  inter, union = int((mask & gt).sum()), int((mask | gt).sum())
  assert (rec["intersection"], rec["union"]) == (inter, union)
  assert m["seg/miou"] == pytest.approx(inter / union)
  # Rendering draws that mask: the drawn pixels differ from a mask-less drawing.
  drawn = runner.rendered(["seg"])["seg"]
  assert drawn.dtype == np.uint8 and drawn.shape[0] == 1
  masks = runner.masks_for(seg_text, (RES, RES))
  np.testing.assert_array_equal(masks[0], mask)


def test_outputs_layout_baseline_and_schedule(env, tmp_path):
  tok, model = env["tok"], env["model"]
  cfg = make_config({"cap": demo_eval("caption", "val[:3]"),
                     "pplx": demo_eval("perplexity", "val[:3]", every=0),
                     "vqa": demo_eval("vqa", "val[:3]", every=4)})
  runner = eval_runner.EvalRunner(cfg, tokenizer=tok, model_config=model)
  assert runner.due(4, 100) == ["vqa"]
  assert runner.due(10, 100) == ["cap"]  # every=None: config.eval_steps.
  assert runner.due(20, 100) == ["cap", "vqa"]
  assert runner.due(100, 100) == ["cap", "pplx", "vqa"]
  assert runner.due(3, 100) == []
  params = random_params(model, 2)
  m = runner.run(params, names=["cap", "pplx"])
  assert math.isclose(m["pplx/perplexity"], math.exp(m["pplx/loss"]))
  paths = runner.write_predictions(str(tmp_path / "two"))
  assert sorted(os.path.relpath(p, tmp_path) for p in paths) == [
      "two/cap/predictions.jsonl", "two/pplx/predictions.jsonl"]
  lines = [json.loads(l) for l in open(paths[1])]
  assert [r["id"] for r in lines] == [0, 1, 2] and "num_tokens" in lines[0]
  assert runner.write_predictions(str(tmp_path / "one"), names=["cap"]) == [
      str(tmp_path / "one" / "predictions.jsonl")]
  drawn = runner.rendered()
  assert list(drawn) == ["cap"] and drawn["cap"].shape[0] == 2  # render_predictions=2.
  # The blank-image baseline: its own keys; the kept predictions are the real run's.
  before = [r["prediction"] for r in runner.predictions["cap"]]
  base = runner.run(params, names=["cap"], blank_images=True)
  assert set(base) == {"baseline/cap/cider", "baseline/cap/bleu-4", "baseline/cap/rouge-l"}
  assert [r["prediction"] for r in runner.predictions["cap"]] == before
  assert "baseline/cap/cider" in runner.final_metrics()
  with pytest.raises(KeyError, match="unknown eval"):
    runner.run(params, names=["nope"])


@pytest.mark.parametrize("entry,match", [
    (dict(demo_eval("caption", "val[:2]"), colour="red"), "config.evals.e: bad option"),
    ({k: v for k, v in demo_eval("vqa", "val[:2]").items() if k != "max_decode_len"},
     "max_decode_len"),
    (dict(demo_eval("perplexity", "val[:2]"), max_decode_len=8), "does not decode"),
    (demo_eval("segmentation", "val[:2]"), "set config.vqvae"),
    (dict(demo_eval("vqa", "val[:2]"), every=-1), "every"),
    (dict(demo_eval("vqa", "val[:2]"), batch_size=0), "batch_size"),
    ({k: v for k, v in demo_eval("vqa", "val[:2]").items() if k != "pp"}, "missing"),
    (dict(demo_eval("vqa", "val[:2]"), data=dict(name="demo", split="test")),
     "config.evals.e: .*split"),
])
def test_config_errors_name_the_eval(env, entry, match):
  with pytest.raises(ValueError, match=match):
    eval_runner.EvalRunner(make_config({"e": entry}), tokenizer=env["tok"],
                           model_config=env["model"])


def test_unknown_type_and_missing_eval_steps(env):
  with pytest.raises(KeyError, match="unknown evaluator 'captions'"):
    eval_runner.EvalRunner(make_config({"e": dict(demo_eval("caption", "val[:2]"),
                                                  type="captions")}),
                           tokenizer=env["tok"], model_config=env["model"])
  runner = eval_runner.EvalRunner(
      make_config({"e": demo_eval("vqa", "val[:2]")}, eval_steps=None),
      tokenizer=env["tok"], model_config=env["model"])
  with pytest.raises(ValueError, match="config.eval_steps"):
    runner.due(5, 10)


def test_jsonable_keeps_small_ground_truth_only():
  ex = {"id": np.int64(3), "prefix": b"detect circle", "image": np.zeros((4, 4, 3)),
        "objects": {"label": np.array(["circle"]), "bbox": np.zeros((1, 4), np.float32),
                    "mask": np.zeros((1, 16, 16), bool)},
        "answers": ["yes", "no"], "masks": np.zeros((1, 2, 2), bool), "height": 16}
  assert eval_runner.example_fields(ex) == {
      "id": 3, "prefix": "detect circle", "answers": ["yes", "no"], "height": 16,
      "objects": {"label": ["circle"], "bbox": [[0.0, 0.0, 0.0, 0.0]]}}
