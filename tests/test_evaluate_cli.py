"""evaluate.py end to end on a tiny random checkpoint and the demo data: metrics.json and
predictions.jsonl agree with the evaluators recomputed from the written predictions, npz
and Hugging Face folders give the same numbers, the command line (config file args,
--config.key overrides, --evals, the default output folder), and model-config overrides."""
import glob
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import evaluate
from big_vision_lite import checkpoints
from big_vision_lite.data import demo
from big_vision_lite.evaluators import caption
from big_vision_lite.evaluators import detection
from big_vision_lite import eval_runner
from test_eval_runner import random_params, tiny_model, write_vqvae, write_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
N = 5  # Validation examples per eval.

CONFIG = '''
import ml_collections
from big_vision_lite.data import demo

MODEL = {model!r}
RES, TEXT_LEN = 16, 24


def get_config(arg=None):
  n = int(arg or {n})
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = MODEL
  c.tokenizer = "demo"
  c.vqvae = {vq!r}
  c.mesh = [("data", -1)]
  c.sharding_rules = "replicate"
  c.render_predictions = 2
  c.eval_steps = 10
  pp = lambda task, train=False: demo.demo_pp(task, image_size=RES, text_len=TEXT_LEN,
                                              train=train)
  data = dict(name="demo", split=f"val[:{{n}}]", image_size=RES)
  dec = dict(batch_size=4, max_decode_len=24)
  c.evals = dict(
      caption=dict(type="caption", data=data, pp=pp("caption"), tokenizer="python", **dec),
      vqa=dict(type="vqa", data=data, pp=pp("vqa"), **dec),
      detection=dict(type="detection", data=data, pp=pp("detect"), **dec),
      segmentation=dict(type="segmentation", data=data, pp=pp("segment"), **dec),
      pplx=dict(type="perplexity", data=data, pp=pp("caption", train=True), batch_size=4),
  )
  return c
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("evaluate")
  tok = demo.demo_tokenizer(str(tmp))
  model = tiny_model(tok.vocab_size)
  params = random_params(model, 3)
  checkpoints.save(str(tmp / "model.npz"), model, params)
  cfg_path = tmp / "eval_config.py"
  cfg_path.write_text(CONFIG.format(model=model, n=N, vq=write_vqvae(str(tmp / "vq.npz"))))
  spec = importlib.util.spec_from_file_location("eval_config", cfg_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return {"tmp": tmp, "model": model, "params": params, "config": module.get_config,
          "cfg_path": cfg_path, "tok": tok}


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_evaluate_writes_metrics_that_the_predictions_reproduce(env, tmp_path):
  metrics = evaluate.evaluate(env["config"](), str(env["tmp"] / "model.npz"),
                              out=str(tmp_path), show_progress=False)
  with open(tmp_path / "metrics.json") as f:
    assert json.load(f) == metrics
  assert {k.split("/")[0] for k in metrics} == {"caption", "vqa", "detection", "segmentation",
                                               "pplx"}
  preds = {name: _read_jsonl(tmp_path / name / "predictions.jsonl")
           for name in ("caption", "vqa", "detection", "segmentation", "pplx")}
  for name, recs in preds.items():
    assert [r["id"] for r in recs] == list(range(N)), name
  for name in ("caption", "vqa", "detection", "segmentation"):
    assert all(isinstance(r["prediction"], str) and r["prefix"] for r in preds[name])

  cap = preds["caption"]
  want = caption.caption_scores({i: r["captions"] for i, r in enumerate(cap)},
                                {i: r["prediction"] for i, r in enumerate(cap)},
                                metrics=("cider", "bleu-4", "rouge-l"), tokenizer="python")
  for k, v in want.items():
    assert metrics[f"caption/{k}"] == pytest.approx(v)
  assert metrics["caption/cider"] < 0.5  # A random model: (near) zero.
  vqa = preds["vqa"]
  assert all(r["question"] and r["answers"] for r in vqa)
  assert metrics["vqa/exact_match"] == pytest.approx(np.mean([r["exact_match"] for r in vqa]))
  det = detection.coco_map(preds["detection"], None)
  for k, v in det.items():
    assert metrics[f"detection/{k}"] == pytest.approx(v), k
  seg = preds["segmentation"]
  assert metrics["segmentation/miou"] == pytest.approx(np.mean([r["mask_iou"] for r in seg]))
  assert metrics["segmentation/num"] == N
  pplx = preds["pplx"]
  loss = sum(r["loss_sum"] for r in pplx) / sum(r["num_tokens"] for r in pplx)
  assert metrics["pplx/loss"] == pytest.approx(loss)
  assert metrics["pplx/perplexity"] == pytest.approx(math.exp(loss))
  # Random weights of this scale spread probability over the 1664 ids, far from certain.
  assert 10 < metrics["pplx/perplexity"] < 1e6
  assert sorted(os.listdir(tmp_path / "rendered")) == sorted(
      f"{n}_{i}.png" for n in ("caption", "vqa", "detection", "segmentation") for i in (0, 1))


@pytest.mark.slow  # Three evaluations and two checkpoint writes (~20-50 s on 2 busy cores).
def test_hf_folder_and_workdir_give_the_same_metrics_as_npz(env, tmp_path):
  checkpoints.save(str(tmp_path / "hf"), env["model"], env["params"], format="hf")
  cfg = env["config"]()
  kw = dict(evals=["caption", "pplx"], show_progress=False)
  a = evaluate.evaluate(cfg, str(env["tmp"] / "model.npz"), out=str(tmp_path / "a"), **kw)
  b = evaluate.evaluate(cfg, str(tmp_path / "hf"), **kw)
  assert a == pytest.approx(b, rel=1e-5)
  # Default output folder of an HF folder: eval/<name> beside it.
  assert (tmp_path / "eval" / "hf" / "metrics.json").is_file()
  assert (_read_jsonl(tmp_path / "a" / "caption" / "predictions.jsonl")
          == _read_jsonl(tmp_path / "eval" / "hf" / "caption" / "predictions.jsonl"))
  # A training workdir: its latest step, outputs in <workdir>/eval; or one step's folder.
  tok_file = glob.glob(str(env["tmp"] / "demo_tokenizer_*.model"))[0]
  workdir = write_workdir(tmp_path / "run", env["model"], env["params"],
                          tokenizer_file=tok_file, step=3)
  assert evaluate.evaluate(cfg, workdir, **kw) == pytest.approx(a, rel=1e-5)
  assert (tmp_path / "run" / "eval" / "pplx" / "predictions.jsonl").is_file()
  step_dir = os.path.join(workdir, "checkpoints", "3")
  assert eval_runner.run_dir(step_dir) == (workdir, 3)
  assert evaluate.default_out_dir(step_dir) == os.path.join(workdir, "eval", "step_3")


def test_command_line(env, tmp_path):
  ckpt = tmp_path / "ckpts" / "model.npz"
  ckpt.parent.mkdir()
  ckpt.write_bytes((env["tmp"] / "model.npz").read_bytes())
  cmd = [sys.executable, str(REPO / "evaluate.py"), f"--config={env['cfg_path']}:3",
         f"--checkpoint={ckpt}", "--evals=vqa",
         "--config.evals.vqa.data.split=val[1:3]"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "ckpts" / "eval" / "model"  # Default: eval/<name> beside the file.
  metrics = json.loads((out / "metrics.json").read_text())
  assert set(metrics) == {"vqa/exact_match", "vqa/vqa_accuracy", "vqa/num"}
  assert metrics["vqa/num"] == 2
  recs = _read_jsonl(out / "predictions.jsonl")  # One eval: no sub-folder.
  assert [r["id"] for r in recs] == [1, 2]
  for key, value in metrics.items():  # The printed table.
    assert any(line.split() == [key, f"{value:.6g}"] for line in proc.stdout.splitlines())
  assert "vqa: 2/2 examples" in proc.stderr

  bad = subprocess.run(cmd[:4] + ["--evals=nope"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode != 0 and "unknown name(s) ['nope']" in bad.stderr


def test_model_overrides_take_settings_only_for_the_same_architecture():
  ckpt = {"img": dict(tiny_model(300)["img"], image_size=16),
          "llm": dict(tiny_model(300)["llm"], final_logits_softcap=30.0)}
  cfg = {"img": dict(image_size=32, dtype="bfloat16"),
         "llm": dict(tiny_model(300)["llm"], final_logits_softcap=0.0, dtype="bfloat16")}
  o = evaluate.model_overrides(cfg, ckpt)
  assert o["img"] == {"image_size": 32, "dtype": "bfloat16"}
  assert o["llm"]["final_logits_softcap"] is None and o["llm"]["dtype"] == "bfloat16"
  other = {"img": {}, "llm": dict(cfg["llm"], depth=5)}
  o = evaluate.model_overrides(other, ckpt)
  assert o == {"img": {}, "llm": {"dtype": "bfloat16"}}
  assert evaluate.model_overrides({}, ckpt) == {"img": {}, "llm": {}}


def test_bad_input_is_a_clear_error(env, tmp_path):
  cfg = env["config"]()
  with pytest.raises(FileNotFoundError, match="no such file"):
    evaluate.evaluate(cfg, str(tmp_path / "missing.npz"))
  del cfg["mesh"]
  with pytest.raises(ValueError, match=r"missing key\(s\) \['mesh'\]"):
    evaluate.evaluate(cfg, str(env["tmp"] / "model.npz"))
