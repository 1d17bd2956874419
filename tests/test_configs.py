"""Transfer configs (configs/{cococap,vqav2,refcoco_seg,refcoco_det,coco_det,forkme}.py).

Every variant x resolution x mode builds and passes train.py's check; model configs give the
official checkpoints' exact parameter shapes; step counts, per-resolution hyper-parameters and
local mode are checked against hand-computed values; every pp string builds with the
registered ops; the pp strings run on records in the exact layout TFDS reads them in
(serialised and parsed by TFDS itself) and give the targets and evaluator inputs expected;
forkme with variant=tiny yields a batch the tiny model accepts.
"""
import inspect
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from big_vision_lite import checkpoints_config, decode, eval_runner, model_init, train_lib
from big_vision_lite import sweep as sweep_lib
from big_vision_lite.data import demo, pipeline
from big_vision_lite.data.pp_parse import PPContext, Preprocess, Runtime
from big_vision_lite.evaluators import base as ev_base
from big_vision_lite.evaluators import perplexity
from big_vision_lite.models import paligemma
from configs import coco_det, cococap, forkme, refcoco_det, refcoco_seg, vqav2
from configs import transfer_common as tc

tfds = pytest.importorskip("tensorflow_datasets")
example_serializer = pytest.importorskip("tensorflow_datasets.core.example_serializer")

TASKS = (cococap, vqav2, refcoco_seg, refcoco_det, coco_det)
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
LLM_TO_VARIANT = {llm: v for v, (llm, _) in tc.VARIANTS.items()}
# Decoding options of an eval entry (the runner passes them to the decoder, the rest to the
# evaluator).
DECODE_KEYS = set(inspect.signature(decode.Decoder.decode).parameters) - {
    "self", "params", "images", "prompts", "max_decode_len"}


def fake_encode_masks(masks):
  """float32[N,64,64,1] -> int[N,16]: the mean of each 16x64 band, scaled to [0, 127]."""
  m = np.asarray(masks)[..., 0]
  return np.round(m.reshape(len(m), 16, -1).mean(-1) * 127).astype(np.int32)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return demo.demo_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def ctx(tok):
  return PPContext(tokenizer=tok, encode_masks=fake_encode_masks, truncate=True)


def run_pp(pp, example, ctx, index=0, epoch=0):
  return Preprocess(pp, ctx)(example, Runtime(seed=0, index=index, epoch=epoch, ctx=ctx))


def all_pps(c):
  yield "input", c.input.pp
  for name, ev in c.evals.items():
    yield name, ev.pp


def check_evals(c):
  """Runner keys, and evaluator kwargs that the registered evaluator class accepts."""
  for name, ev in c.evals.items():
    ev = ev.to_dict()
    assert isinstance(ev["batch_size"], int) and ev["batch_size"] > 0, name
    assert isinstance(ev["every"], int) and 0 <= ev["every"] <= c.total_steps, name
    kwargs = {k: v for k, v in ev.items()
              if k not in eval_runner.RUNNER_KEYS and k not in DECODE_KEYS}
    if ev["type"] == "perplexity":
      assert "max_decode_len" not in ev and not set(ev) & DECODE_KEYS, name
      assert 'keep("image", "text", "mask_ar", "mask_loss", "mask_input")' in ev["pp"], name
    else:
      assert ev["max_decode_len"] >= 4, name
      assert ev["pp"].endswith(")") and 'keep("image", "prefix", "id"' in ev["pp"], name
    # Constructing the evaluator checks the kwargs' names and values.
    ev_base.create(ev["type"], examples=[], batch_size=ev["batch_size"], **kwargs)


def check_built_config(c, ctx, res, local):
  """What train.py and its pipeline reject, checked without data or weights."""
  train_lib.check_config(c)
  assert c.input.batch_size > 0 and c.total_steps > 0 and 0 < c.eval_steps <= c.total_steps
  paligemma.resolve_config(c.model.to_dict())  # Unknown model keys would be errors.
  input_cfg = c.input.to_dict()
  del input_cfg["text_len"]  # Read by the pp helpers; train_lib drops it before the pipeline.
  pipeline.parse_input_config(input_cfg)  # Unknown or missing input keys would be errors.
  for where, pp in all_pps(c):
    assert f"resize({res}" in pp, where  # Images at the model's resolution.
    Preprocess(pp, ctx)  # Every op registered, every argument accepted.
  check_evals(c)
  if local:
    assert (c.total_steps, c.log_steps, c.input.batch_size) == (10, 1, 8)
    assert c.input.shuffle_buffer_size == 0
    for ev in c.evals.values():
      assert ev.data.split.endswith("[:16]") and ev.every == 0 and ev.batch_size == 8


# ---------------------------------------------------------------------------- building
@pytest.mark.parametrize("mode", tc.MODES)
@pytest.mark.parametrize("res", tc.RESOLUTIONS)
@pytest.mark.parametrize("variant", tuple(tc.VARIANTS))
@pytest.mark.parametrize("task", TASKS, ids=lambda m: m.__name__.split(".")[-1])
def test_task_configs_build_and_check(task, variant, res, mode, ctx, fixtures_dir):
  c = task.get_config(f"variant={variant},res={res},mode={mode}")
  check_built_config(c, ctx, res, local=mode == "local")
  official = json.loads((fixtures_dir / "param_shapes" / f"{c.model_init}.json").read_text())
  assert official["image_resolution"] == res
  assert official["big_vision_model_config"]["llm"]["variant"] == c.model.llm.variant
  assert c.model.img.image_size == res and c.model.img.variant == "So400m/14"
  assert c.tokenizer.endswith("/paligemma_tokenizer.model")
  assert model_init.vanity_candidates(c.model_init)  # A name model_init.py resolves.


@pytest.mark.parametrize("task", TASKS, ids=lambda m: m.__name__.split(".")[-1])
def test_bad_args_are_errors(task):
  with pytest.raises(ValueError, match="expected name=value with name in"):
    task.get_config("resolution=224")
  with pytest.raises(ValueError, match="variant must be one of"):
    task.get_config("variant=pg2_9b")
  with pytest.raises(ValueError, match="res must be one of"):
    task.get_config("res=336")
  with pytest.raises(ValueError, match="mode must be one of"):
    task.get_config("mode=runlocal")
  with pytest.raises(ValueError, match="expected a int"):
    task.get_config("res=high")


def test_checkpoint_dir_from_the_environment(monkeypatch):
  monkeypatch.setenv(tc.CHECKPOINT_DIR_ENV, "/ckpts")
  c = refcoco_seg.get_config()
  assert c.tokenizer == "/ckpts/paligemma_tokenizer.model" and c.vqvae == "/ckpts/vae-oid.npz"
  monkeypatch.delenv(tc.CHECKPOINT_DIR_ENV)
  assert cococap.get_config().tokenizer == "$BVL_CHECKPOINT_DIR/paligemma_tokenizer.model"


# ------------------------------------------------------------------------- model configs
def test_model_configs_give_the_official_parameter_shapes(fixtures_dir):
  files = sorted((fixtures_dir / "param_shapes").glob("pt_*.json"))
  assert len(files) == 12
  for f in files:
    official = json.loads(f.read_text())
    variant = LLM_TO_VARIANT[official["big_vision_model_config"]["llm"]["variant"]]
    c = vqav2.get_config(f"variant={variant},res={official['image_resolution']}")
    assert c.model_init == official["vanity_name"] == f.stem
    shapes = checkpoints_config.param_shapes(c.model.to_dict())
    assert shapes == {k: tuple(v) for k, v in official["params"].items()}, f.name
    assert sum(math.prod(s) for s in shapes.values()) == official["total_params"]


@pytest.mark.parametrize("task,variant", [
    (cococap, "pg1_3b"), (vqav2, "pg2_3b"), (refcoco_seg, "pg2_10b"), (refcoco_det, "pg1_3b"),
    (coco_det, "pg2_28b")], ids=lambda x: x if isinstance(x, str) else x.__name__[8:])
def test_train_py_builds_model_and_optimizer(task, variant, fixtures_dir):
  # What train.py does before allocating anything: abstract params, then the optimizer.
  c = task.get_config(f"variant={variant},res=224")
  abstract = train_lib.abstract_params(train_lib.make_model(c.model.to_dict()), c)
  shapes = {"/".join(k.key for k in path): x.shape
            for path, x in jax.tree_util.tree_leaves_with_path(abstract)}
  official = json.loads((fixtures_dir / "param_shapes" / f"{c.model_init}.json").read_text())
  assert shapes == {k: tuple(v) for k, v in official["params"].items()}
  tx, lr_fns = train_lib.make_optimizer(c, abstract)[:2]
  assert float(lr_fns["lr"](round(0.05 * c.total_steps))) == pytest.approx(c.lr, rel=1e-3)
  jax.eval_shape(tx.init, abstract)


def test_resolved_model_settings():
  r = paligemma.resolve_config(cococap.get_config("variant=pg1_3b").model.to_dict())
  assert r["llm"]["final_logits_softcap"] is None and not r["llm"]["post_norms"]
  assert r["llm"]["remat_policy"] == "none" and r["llm"]["vocab_size"] == 257152
  for variant, remat in (("pg2_3b", "none"), ("pg2_10b", "nothing_saveable"),
                         ("pg2_28b", "nothing_saveable")):
    r = paligemma.resolve_config(cococap.get_config(f"variant={variant}").model.to_dict())
    # Transfers train without the final soft-cap (0 -> off); Gemma 2's attention cap stays.
    assert r["llm"]["final_logits_softcap"] is None and r["llm"]["attn_logits_softcap"] == 50
    assert r["llm"]["remat_policy"] == remat and r["img"]["remat_policy"] == "none"
  r = paligemma.resolve_config(refcoco_seg.get_config("res=224").model.to_dict())
  assert r["llm"]["dropout"] == 0.1 and r["img"]["dropout"] == 0.0


# ------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize("config,arg,steps,batch,lr,wd,ls", [
    # 5 epochs * (81,127 + 30,504) / 256; final: 5 * 113,287 / 256.
    (cococap, "", 2180, 256, 1e-5, 1e-6, 0.0),
    (cococap, "final_split=True,res=448", 2213, 256, 1e-5, 1e-6, 0.0),
    # 10 epochs * (443,757 + 214,354 - 10,240) / 256; final: 10 * 658,111 / 256.
    (vqav2, "", 25307, 256, 1e-5, 1e-6, 0.0),
    (vqav2, "res=448,final_split=True", 25707, 256, 1e-5, 0.0, 0.0),
    (vqav2, "res=896", 25307, 256, 1e-5, 0.0, 0.0),
    # 100 epochs * 24,400 / 256 (224, 448) or / 64 (896).
    (refcoco_seg, "res=224", 9531, 256, 3e-5, 0.0, 0.3),
    (refcoco_seg, "res=448", 9531, 256, 1e-5, 0.0, 0.3),
    (refcoco_seg, "res=896", 38125, 64, 1e-5, 0.0, 0.3),
    (refcoco_det, "res=224,variant=pg2_10b", 9531, 256, 3e-5, 0.0, 0.3),
    (refcoco_det, "res=896", 38125, 64, 1e-5, 0.0, 0.3),
    # 10 epochs * 118,287 / 256 or / 64.
    (coco_det, "res=448", 4621, 256, 1e-5, 0.0, 0.3),
    (coco_det, "res=896", 18482, 64, 1e-5, 0.0, 0.3),
])
def test_steps_and_hyperparameters(config, arg, steps, batch, lr, wd, ls):
  c = config.get_config(arg)
  assert (c.total_steps, c.input.batch_size, c.lr, c.wd, c.label_smoothing) == (
      steps, batch, lr, wd, ls)
  assert c.optax_name == "scale_by_adam" and c.grad_clip_norm == 1.0
  assert c.schedule.to_dict() == dict(decay_type="cosine", warmup_percent=0.05)
  assert [tuple(r) for r in c.wd_mults] == [(".*/kernel$", 1.0)]


def test_eval_periods():
  c = cococap.get_config()  # 2180 steps: decoding every 10%, perplexity every 5%.
  assert c.eval_steps == 218 and c.evals.val.every == 218 and c.evals.val_pplx.every == 109
  assert c.evals.val.beam_size == 2 and cococap.get_config("beam_size=1").evals.val.beam_size == 1
  c = refcoco_det.get_config()  # 9531 steps: refcoco val every 20%, the rest at the end.
  assert c.evals.refcoco_val.every == 1906 and c.evals.refcocog_test.every == 0
  assert c.evals.refcocop_testB.data.to_dict() == dict(
      name="ref_coco_bv/refcocoplus_unc:1.4.0", split="testB_flat")
  assert c.evals.val_pplx.every == 477


# ------------------------------------------------------------------------------ sweeps
def test_sweeps_expand_into_runs_train_py_accepts():
  expand = lambda spec: sweep_lib.expand(str(CONFIGS / spec))
  # pg1_3b: big_vision's sweep_best, one run per published resolution.
  runs, metrics = expand("refcoco_seg.py:mode=local")
  assert [(r.config_arg, r.flags) for r in runs] == [
      ("mode=local,res=224", []), ("mode=local,res=448", []), ("mode=local,res=896", [])]
  assert metrics == ["val_pplx/perplexity", "minitrain_pplx/perplexity"]
  runs, metrics = expand("cococap.py")
  assert [r.config_arg for r in runs] == ["res=224", "res=448"] and runs[0].total_steps == 2180
  assert metrics[0] == "val/cider"
  # PaliGemma 2 and our own recipes: the learning rate x1/3, x1, x3 around the default.
  runs, _ = expand("vqav2.py:variant=pg2_10b,res=448")
  assert [r.flags for r in runs] == [["--config.lr=3.3e-06"], ["--config.lr=1e-05"],
                                     ["--config.lr=3e-05"]]
  runs, metrics = expand("refcoco_det.py:res=224")
  assert [r.overrides for r in runs] == [{"lr": 1e-05}, {"lr": 3e-05}, {"lr": 9e-05}]
  assert metrics[0] == "refcoco_val/acc@0.5"


# ------------------------------------------------------- pp strings on TFDS-layout records
def tfds_record(features, example):
  """`example` serialised and parsed by TFDS as TfdsSource reads it (image left encoded).

  Images are given as files: TFDS then stores their bytes (and decodes PNG masks) without
  TensorFlow, whose first use costs ~10 s.
  """
  raw = example_serializer.ExampleSerializer(features.get_serialized_info()).serialize_example(
      features.encode_example(example))
  return dict(features.deserialize_example_np(
      raw, decoders={"image": tfds.decode.SkipDecoding()}))


def image(h=30, w=40, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def image_file(folder, name, array):
  """Writes uint8[H,W,C] to folder/name (format from the suffix); returns the path."""
  path = str(folder / name)
  PIL.Image.fromarray(array).save(path)
  return path


def suffix_text(out, tok):
  """The decoded loss tokens (suffix + eos) of a train-layout example."""
  return tok.decode(out["text"][out["mask_loss"] == 1].tolist())


def prefix_text(out, tok):
  return tok.decode(out["text"][(out["mask_ar"] == 0) & (out["mask_input"] == 1)].tolist())


def test_cococap_pps(ctx, tok, tmp_path):
  features = tfds.features.FeaturesDict({  # TFDS coco_captions.
      "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
      "image": tfds.features.Image(), "image/filename": tfds.features.Text(),
      "image/id": np.int64})
  captions = ["a cat on a mat", "two dogs", "a red bus"]
  ex = tfds_record(features, {"image": image_file(tmp_path, "1.jpg", image()),
                              "image/filename": "1.jpg", "image/id": 7,
                              "captions": [dict(id=i, text=t) for i, t in enumerate(captions)]})
  pp = cococap.train_pp(224)
  seen = set()
  for epoch in range(3):  # One caption per epoch, each once per 3 epochs.
    out = run_pp(pp, ex, ctx, epoch=epoch)
    assert out["image"].shape == (224, 224, 3) and out["text"].shape == (33,)
    assert prefix_text(out, tok) == "caption en\n"
    seen.add(suffix_text(out, tok))
  assert seen == set(captions)
  ev = run_pp(cococap.eval_pp(224), ex, ctx)
  assert set(ev) == {"image", "prefix", "id", "captions"} and ev["prefix"] == "caption en"
  rec = ev_base.create("caption", examples=[]).score_example(ev, "a cat")
  assert rec == {"id": 7, "prediction": "a cat", "captions": captions}


def test_vqav2_pps(ctx, tok, tmp_path):
  features = tfds.features.FeaturesDict({  # big_vision's datasets/vqa/vqa.py.
      "image/id": np.int32, "image/filename": tfds.features.Text(),
      "image": tfds.features.Image(encoding_format="jpeg"), "question_id": np.int32,
      "question_type": tfds.features.Text(), "question_text": tfds.features.Text(),
      "answer_type": tfds.features.Text(),
      "answers": tfds.features.Sequence(tfds.features.Text()),
      "answer_confidences": tfds.features.Sequence(
          tfds.features.ClassLabel(names=["no", "maybe", "yes"])),
      "top_answer": tfds.features.Text()})
  answers = ["2"] * 4 + ["two"] * 3 + ["3"] * 3
  ex = tfds_record(features, {
      "image/id": 3, "image/filename": "3.jpg", "image": image_file(tmp_path, "3.jpg", image()),
      "question_id": 3001,
      "question_type": "how many", "question_text": "How many cats?", "answer_type": "number",
      "answers": answers, "answer_confidences": ["yes"] * 10, "top_answer": "2"})
  out = run_pp(vqav2.train_pp(448), ex, ctx)
  assert out["image"].shape == (448, 448, 3) and out["text"].shape == (33,)
  assert prefix_text(out, tok) == "answer en How many cats?\n"
  assert suffix_text(out, tok) in {"2", "two", "3"}
  ev = run_pp(vqav2.eval_pp(448), ex, ctx)
  assert ev["prefix"] == "answer en How many cats?"
  rec = ev_base.create("vqav2", examples=[]).score_example(ev, "two")
  # "two" -> "2" by the official normalisation: 7 of 10 answers match.
  assert rec["id"] == 3001 and rec["answer_type"] == "number"
  assert rec["vqa_accuracy"] == pytest.approx(1.0)


REFCOCO_FEATURES = dict(  # big_vision's datasets/refcoco/refcoco.py (the fields used).
    id=np.int32, image=tfds.features.Image(encoding_format="jpeg"), height=np.int32,
    width=np.int32, objects=tfds.features.Sequence({
        "id": np.int64, "area": np.float32, "bbox": tfds.features.BBoxFeature(),
        "mask": tfds.features.Image(encoding_format="png"),
        "refs": tfds.features.Sequence({"id": np.int32, "sentence": tfds.features.Text()})}))
H, W = 30, 40
BOXES = ((6, 8, 18, 24), (3, 20, 27, 36))  # Pixel y1 x1 y2 x2 of the two objects.


def refcoco_objects(folder, flat_ref=None):
  """Two objects (object j has j + 1 sentences); flat_ref=(j, k) keeps one, as *_flat."""
  objects = []
  for j, (y1, x1, y2, x2) in enumerate(BOXES):
    mask = np.zeros((H, W, 3), np.uint8)
    mask[y1:y2, x1:x2] = 255
    mask = image_file(folder, f"mask{j}.png", mask)
    refs = [dict(id=100 * j + k, sentence=f"the thing {j} number {k}") for k in range(j + 1)]
    objects.append(dict(id=j, area=float((y2 - y1) * (x2 - x1)), mask=mask, refs=refs,
                        bbox=tfds.features.BBox(y1 / H, x1 / W, y2 / H, x2 / W)))
  if flat_ref is not None:
    j, k = flat_ref
    objects = [dict(objects[j], refs=[objects[j]["refs"][k]])]
  return objects


def refcoco_record(folder, flat_ref=None):
  features = tfds.features.FeaturesDict(REFCOCO_FEATURES)
  return tfds_record(features, dict(id=5, image=image_file(folder, "5.jpg", image(H, W)),
                                    height=H, width=W, objects=refcoco_objects(folder, flat_ref)))


def loc_text(j):
  box = np.array(BOXES[j], np.float64) / [H, W, H, W]
  return "".join(f"<loc{int(v):04d}>" for v in np.clip(np.round(box * 1023), 0, 1023))


def test_refcoco_seg_train_pp(ctx, tok, tmp_path):
  ex = refcoco_record(tmp_path)
  assert ex["objects"]["mask"][1].shape == (H, W, 3)  # uint8 {0, 255}, as big_vision's.
  for epoch in range(2):  # choice_no_replacement: each object once in two epochs.
    out = run_pp(refcoco_seg.train_pp(224), ex, ctx, epoch=epoch)
    assert out["text"].shape == (49,) and int(out["mask_loss"].sum()) == 4 + 16 + 1
    prefix = prefix_text(out, tok)
    j = int(re.fullmatch(r"the thing (\d) number \d\n", prefix).group(1))
    # Box then 16 codes; the crop is all mask, so the fake encoder gives code 127.
    assert suffix_text(out, tok) == loc_text(j) + "<seg127>" * 16


def test_refcoco_det_pps(ctx, tok, tmp_path):
  out = run_pp(refcoco_det.train_pp(448), refcoco_record(tmp_path), ctx)
  m = re.fullmatch(r"detect (the thing (\d) number \d)\n", prefix_text(out, tok))
  assert m and out["text"].shape == (65,)
  assert suffix_text(out, tok) == f"{loc_text(int(m.group(2)))} {m.group(1)}"
  ev = run_pp(refcoco_det.eval_pp(448), refcoco_record(tmp_path, flat_ref=(1, 1)), ctx)
  assert ev["prefix"] == "detect the thing 1 number 1" and int(ev["id"]) == 101
  assert ev["image"].shape == (448, 448, 3) and (int(ev["height"]), int(ev["width"])) == (H, W)
  evaluator = ev_base.create("refcoco", examples=[], iou_thresholds=(0.5,))
  rec = evaluator.score_example(ev, f"{loc_text(1)} the thing 1 number 1")
  assert rec["id"] == 101 and rec["iou"] > 0.95  # Exact up to the 1/1023 loc binning.
  assert evaluator.score_example(ev, f"{loc_text(0)} other")["iou"] < 0.5


def test_coco_det_train_pp(ctx, tok, tmp_path):
  features = tfds.features.FeaturesDict({  # TFDS coco/2017.
      "image": tfds.features.Image(), "image/filename": tfds.features.Text(),
      "image/id": np.int64, "objects": tfds.features.Sequence({
          "area": np.int64, "bbox": tfds.features.BBoxFeature(), "id": np.int64,
          "is_crowd": np.bool_, "label": tfds.features.ClassLabel(names=coco_det.CATEGORIES)})})
  objects = [dict(area=1, bbox=tfds.features.BBox(*np.array(b) / [H, W, H, W]), id=i,
                  is_crowd=False, label=label)
             for i, (b, label) in enumerate(zip(BOXES, ("teddy bear", "person")))]
  ex = tfds_record(features, {"image": image_file(tmp_path, "9.png", image(H, W)),
                              "image/filename": "9.png", "image/id": 9,
                              "objects": objects})
  out = run_pp(coco_det.train_pp(224), ex, ctx)
  assert out["text"].shape == (513,)
  assert prefix_text(out, tok) == coco_det.PROMPT + "\n"
  assert coco_det.PROMPT.startswith("detect person ; bicycle ; car ; ")
  assert coco_det.PROMPT.endswith(" ; hair drier ; toothbrush") and len(coco_det.CATEGORIES) == 80
  assert suffix_text(out, tok) == f"{loc_text(0)} teddy bear ; {loc_text(1)} person"


# --------------------------------------------------------------------------------- forkme
@pytest.fixture()
def jsonl_data(tmp_path):
  (tmp_path / "img").mkdir()
  rows = []
  for i in range(4):
    PIL.Image.fromarray(image(20 + i, 30, seed=i)).save(tmp_path / "img" / f"{i}.png")
    rows.append(json.dumps({"image": f"img/{i}.png", "prefix": f"describe {i}",
                            "suffix": f"picture number {i}"}))
  (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
  (tmp_path / "val.jsonl").write_text("\n".join(rows[:2]) + "\n")
  return tmp_path


@pytest.mark.parametrize("variant", (*tc.VARIANTS, "tiny"))
def test_forkme_builds(variant, jsonl_data, ctx):
  files = f"train_data={jsonl_data / 'train.jsonl'},val_data={jsonl_data / 'val.jsonl'}"
  for res in (tc.RESOLUTIONS if variant != "tiny" else (28, 224)):
    for mode in tc.MODES:
      c = forkme.get_config(f"{files},variant={variant},res={res},mode={mode},batch_size=2")
      check_built_config(c, ctx, res, local=mode == "local")
      assert c.total_steps == (10 if mode == "local" else 30)  # 15 epochs * 4 lines / 2.
      assert c.model_init == (None if variant == "tiny" else tc.vanity_name(variant, res))
      assert c.lr == (1e-3 if variant == "tiny" else 1e-5) and set(c.evals) == {"val", "val_pplx"}
  c = forkme.get_config(f"train_data={jsonl_data / 'train.jsonl'},freeze_vit=True")
  assert c.schedule == [("img/.*", None), ("llm/.*", dict(decay_type="cosine",
                                                          warmup_percent=0.05))]
  assert forkme.get_config(f"train_data={jsonl_data / 'train.jsonl'}").evals.to_dict() == {}
  assert forkme.metrics(f"train_data={jsonl_data / 'train.jsonl'}") == ["loss"]
  assert forkme.metrics(files)[0] == "val/anls"
  points = []
  forkme.sweep(lambda **kw: points.append(kw), f"{files},variant=tiny,res=28")
  assert points == [{"lr": 3.3e-4}, {"lr": 1e-3}, {"lr": 3e-3}]


def test_forkme_errors(jsonl_data):
  with pytest.raises(ValueError, match="pass train_data="):
    forkme.get_config("variant=tiny")
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    forkme.get_config(f"train_data={jsonl_data / 'nope.jsonl'}")
  train = f"train_data={jsonl_data / 'train.jsonl'}"
  with pytest.raises(ValueError, match="multiple of 14"):
    forkme.get_config(f"{train},variant=tiny,res=30")
  with pytest.raises(ValueError, match="res must be one of"):
    forkme.get_config(f"{train},variant=pg2_3b,res=28")
  with pytest.raises(ValueError, match="expected name=value"):
    forkme.get_config(f"{train},lr=1e-4")


def test_forkme_tiny_trains_on_a_batch(jsonl_data, tok):
  c = forkme.get_config(f"train_data={jsonl_data / 'train.jsonl'},variant=tiny,res=28,"
                        "batch_size=2,text_len=24")
  tokenizer = train_lib.make_tokenizer(c, str(jsonl_data))
  model_config = train_lib.model_config(c, tokenizer)
  it = train_lib.make_train_iterator(c, tokenizer, data_sharding=None, encode_masks=None)
  try:
    batch = next(it)
  finally:
    it.close()
  assert batch["image"].shape == (2, 28, 28, 3) and batch["text"].shape == (2, 25)
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1
  for row in range(2):
    one = {k: v[row] for k, v in batch.items()}
    i = int(re.fullmatch(r"describe (\d)\n", prefix_text(one, tokenizer)).group(1))
    assert suffix_text(one, tokenizer) == f"picture number {i}"
  # The batch fits the tiny model: logits over its vocabulary for every input token.
  model = train_lib.make_model(model_config)
  text = jnp.asarray(batch["text"][:, :-1])
  logits = jax.eval_shape(
      lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.asarray(batch["image"]), text,
                                     jnp.asarray(batch["mask_ar"][:, :-1]))[0][0])
  assert logits.shape == (2, 24, forkme.TINY_VOCAB) == (2, 24, tokenizer.vocab_size)


def test_forkme_eval_examples(jsonl_data, tok):
  c = forkme.get_config(f"train_data={jsonl_data / 'train.jsonl'},variant=tiny,res=28,"
                        f"val_data={jsonl_data / 'val.jsonl'},text_len=24")
  kw = dict(tokenizer=tok, process_index=0, process_count=1)
  examples = list(pipeline.eval_examples(c.evals.val.data, c.evals.val.pp, **kw))
  assert [(e["id"], e["prefix"], e["answer"]) for e in examples] == [
      (0, "describe 0", "picture number 0"), (1, "describe 1", "picture number 1")]
  assert examples[0]["image"].shape == (28, 28, 3)
  evaluator = ev_base.create("vqa", examples=[], metrics=c.evals.val.metrics)
  rec = evaluator.score_example(examples[1], "picture number 1")
  assert (rec["exact_match"], rec["anls"]) == (1.0, 1.0)
  assert evaluator.score_example(examples[1], "picture number 7")["exact_match"] == 0.0
  scored = list(pipeline.eval_examples(c.evals.val_pplx.data, c.evals.val_pplx.pp, **kw))
  assert set(scored[0]) >= set(perplexity.SCORE_KEYS) and scored[0]["text"].shape == (25,)
  assert suffix_text(scored[1], tok) == "picture number 1"
