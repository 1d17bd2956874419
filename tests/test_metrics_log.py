"""metrics.jsonl, TensorBoard events (read back with TensorFlow's reader), log lines, throughput."""
import io
import json

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from big_vision_lite.metrics_log import MetricsLogger, Throughput, format_duration, format_log_line


class FakeClock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t


class FakeTTY(io.StringIO):
  def isatty(self):
    return True


def _read_events(workdir):
  """{tag: [(step, value or PIL image)]} from the event files, via TensorFlow's own reader."""
  tf = pytest.importorskip("tensorflow")
  files = sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert files, f"no event file in {workdir / 'tensorboard'}"
  out = {}
  for f in files:
    for event in tf.compat.v1.train.summary_iterator(str(f)):
      for v in event.summary.value:
        if v.HasField("image"):
          value = PIL.Image.open(io.BytesIO(v.image.encoded_image_string))
        else:
          value = v.simple_value
        out.setdefault(v.tag, []).append((event.step, value))
  return out


def test_jsonl_tensorboard_and_pngs(tmp_path):
  stream = io.StringIO()
  logger = MetricsLogger(tmp_path, total_steps=4000, is_primary=True, stream=stream)
  logger.log(10, {"loss": jnp.float32(2.5), "lr": np.float64(3e-4), "examples_seen": 320})
  logger.log(20, {"loss": 2.25, "lr": 2.5e-4, "examples_seen": np.int64(640)})
  images = np.zeros((2, 8, 12, 3), np.uint8)
  images[0, :, :, 0] = 255  # Red.
  images[1, 2:4, 3:9] = (10, 200, 30)
  paths = logger.log_images(20, "val/pred", images)
  logger.close()

  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert [r["step"] for r in records] == [10, 20]
  assert records[0]["loss"] == 2.5 and records[1]["loss"] == 2.25
  assert records[0]["lr"] == 3e-4
  assert records[1]["examples_seen"] == 640 and isinstance(records[1]["examples_seen"], int)
  assert all(isinstance(r["time"], float) and r["time"] > 1.6e9 for r in records)
  assert set(records[0]) == {"step", "time", "loss", "lr", "examples_seen"}

  assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
      "predictions/20/val_pred_0.png", "predictions/20/val_pred_1.png"]
  np.testing.assert_array_equal(np.asarray(PIL.Image.open(paths[1])), images[1])

  events = _read_events(tmp_path)
  assert events["loss"] == [(10, 2.5), (20, 2.25)]
  assert [s for s, _ in events["lr"]] == [10, 20]
  np.testing.assert_allclose([v for _, v in events["lr"]], [3e-4, 2.5e-4], rtol=1e-6)
  assert events["examples_seen"] == [(10, 320.0), (20, 640.0)]
  for i in range(2):
    (step, png), = events[f"val/pred/{i}"]
    assert step == 20
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), images[i])

  out = stream.getvalue().splitlines()
  assert out == ["step 10/4000 | loss 2.5 | lr 3.0e-04 | examples_seen 320",
                 "step 20/4000 | loss 2.25 | lr 2.5e-04 | examples_seen 640"]


def test_log_images_of_different_sizes(tmp_path):
  with MetricsLogger(tmp_path, total_steps=10, is_primary=True, tensorboard=False,
                     stream=io.StringIO()) as logger:
    images = [np.full((4, 6, 3), 7, np.uint8), np.full((5, 3, 3), 9, np.uint8)]
    paths = logger.log_images(3, "eval/refcoco", images)
  assert [p.name for p in paths] == ["eval_refcoco_0.png", "eval_refcoco_1.png"]
  for p, x in zip(paths, images):
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(p)), x)


def test_jsonl_appends_on_resume(tmp_path):
  with MetricsLogger(tmp_path, total_steps=10, is_primary=True, tensorboard=False,
                     stream=io.StringIO()) as logger:
    logger.log(1, {"loss": 1.0})
  with MetricsLogger(tmp_path, total_steps=10, is_primary=True, tensorboard=False,
                     stream=io.StringIO()) as logger:
    logger.log(2, {"loss": 0.5})
  steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2]
  assert not (tmp_path / "tensorboard").exists()


def test_non_primary_writes_nothing(tmp_path):
  stream = io.StringIO()
  logger = MetricsLogger(tmp_path / "run", total_steps=10, is_primary=False, stream=stream)
  line = logger.log(1, {"loss": 1.0})
  assert logger.log_images(1, "x", np.zeros((1, 4, 4, 3), np.uint8)) == []
  logger.close()
  assert line == "step 1/10 | loss 1"
  assert not (tmp_path / "run").exists()
  assert stream.getvalue() == ""


def test_default_is_primary_from_jax(tmp_path):
  with MetricsLogger(tmp_path, total_steps=None, tensorboard=False,
                     stream=io.StringIO()) as logger:
    assert logger.is_primary  # Single-process test: process_index() == 0.


def test_full_log_line_format():
  metrics = {"loss": 2.3141, "lr": 3e-4, "grad_norm": 1.0213, "examples_per_s": 812.4,
             "tokens_per_s": 41512.0, "mfu": 0.3821, "input_wait": 0.0131, "eta_s": 372.0,
             "step_time_s": 0.5}
  assert format_log_line(120, 4000, metrics) == (
      "step 120/4000 | loss 2.314 | lr 3.0e-04 | gnorm 1.02 | 812 ex/s | 41.5k tok/s | "
      "MFU 38.2% | wait 1.3% | ETA 6m12s")


def test_log_line_aliases_extras_and_missing_keys():
  line = format_log_line(5, None, {"training_loss": 0.01234, "learning_rate": 1e-5,
                                   "l2_grads": 12.345, "eval/cider": 1.0456,
                                   "input_wait_frac": 0.25})
  assert line == "step 5 | loss 0.01234 | lr 1.0e-05 | gnorm 12.3 | wait 25.0% | eval/cider 1.046"
  assert format_log_line(7, 9, {}) == "step 7/9"
  assert format_log_line(7, 9, {"tokens_per_s": 2.5e6, "examples_per_s": 999.9}) == (
      "step 7/9 | 1k ex/s | 2.5M tok/s")


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (45.4, "45s"), (59.6, "1m00s"), (372, "6m12s"), (3599, "59m59s"),
    (3720, "1h02m"), (86399, "23h59m"), (180000, "2d02h"), (float("nan"), "?"), (-1, "?")])
def test_format_duration(seconds, text):
  assert format_duration(seconds) == text


def test_progress_bar_on_a_terminal(tmp_path):
  stream = FakeTTY()
  with MetricsLogger(tmp_path, total_steps=100, is_primary=True, tensorboard=False,
                     stream=stream) as logger:
    assert logger._bar is not None  # pylint: disable=protected-access
    logger.log(50, {"loss": 1.0})
    assert logger._bar.n == 50  # pylint: disable=protected-access
  text = stream.getvalue()
  assert "step 50/100 | loss 1" in text
  assert "50/100" in text.replace("step 50/100", "")  # The bar's own counter.
  assert "\r" in text  # tqdm redraws in place.


def test_plain_lines_without_a_terminal(tmp_path):
  stream = io.StringIO()
  with MetricsLogger(tmp_path, total_steps=100, is_primary=True, tensorboard=False,
                     stream=stream) as logger:
    assert logger._bar is None  # pylint: disable=protected-access
    logger.log(1, {"loss": 1.0})
  assert stream.getvalue() == "step 1/100 | loss 1\n"


def test_bad_input_errors(tmp_path):
  with MetricsLogger(tmp_path, total_steps=10, is_primary=True, tensorboard=False,
                     stream=io.StringIO()) as logger:
    with pytest.raises(ValueError, match="metric 'acc' must be a real scalar.*\\[3\\]"):
      logger.log(1, {"acc": np.zeros(3)})
    with pytest.raises(ValueError, match="metric 'name' must be a real scalar"):
      logger.log(1, {"name": "abc"})
    with pytest.raises(ValueError, match="reserved"):
      logger.log(1, {"time": 3.0})
    with pytest.raises(ValueError, match=r"log_images\('x'\): expected uint8\[N,H,W,3\] .*"
                                         r"got float32\[4, 4, 3\] at index 0"):
      logger.log_images(1, "x", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"got uint8\[4, 4\] at index 1"):
      logger.log_images(1, "x", [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)])
    with pytest.raises(ValueError, match=r"got uint8\[4, 4\] at index 0"):
      logger.log_images(1, "x", np.zeros((4, 4), np.uint8))
  with pytest.raises(RuntimeError, match="after close"):
    logger.log(2, {"loss": 1.0})


def test_throughput_rates_wait_and_eta():
  clock = FakeClock()
  tput = Throughput(total_steps=1000, ema_decay=0.5, clock=clock)
  clock.t += 30.0  # Compilation of the first step ...
  tput.reset(1)  # ... is not counted.
  clock.t += 1.0
  with tput.waiting():
    clock.t += 0.5
  clock.t += 8.5
  out = tput.update(11, examples=10 * 32, tokens=10 * 32 * 64)
  # 10 steps in 10 s: 1 s/step, 32 examples and 2048 tokens per step.
  assert out == pytest.approx({"examples_per_s": 32.0, "tokens_per_s": 2048.0, "step_time_s": 1.0,
                               "input_wait": 0.05, "eta_s": 989.0})
  clock.t += 4.0
  with tput.paused():  # An evaluation: not step time.
    clock.t += 100.0
  clock.t += 1.0
  out = tput.update(21, examples=320)
  # 10 steps in 5 s: 0.5 s/step; EMA 0.5 * 1.0 + 0.5 * 0.5 = 0.75 s/step; 979 steps left.
  assert out == pytest.approx({"examples_per_s": 64.0, "step_time_s": 0.5, "input_wait": 0.0,
                               "eta_s": 979 * 0.75})
  assert "tokens_per_s" not in out


def test_throughput_without_total_and_bad_steps():
  clock = FakeClock()
  tput = Throughput(clock=clock, start_step=100)
  clock.t += 2.0
  assert "eta_s" not in tput.update(102, examples=8)
  with pytest.raises(ValueError, match="step 102 must be after the previous 102"):
    tput.update(102, examples=8)
  with pytest.raises(ValueError, match="ema_decay"):
    Throughput(ema_decay=1.0)


def test_throughput_feeds_the_log_line():
  clock = FakeClock()
  tput = Throughput(total_steps=4000, clock=clock, start_step=100)
  clock.t += 20 * 0.465
  rates = tput.update(120, examples=20 * 377.6, tokens=20 * 19300.0)
  line = format_log_line(120, 4000, {"loss": 2.314, **rates})
  assert line == "step 120/4000 | loss 2.314 | 812 ex/s | 41.5k tok/s | wait 0.0% | ETA 30m04s"
  assert rates["eta_s"] == pytest.approx(3880 * 0.465)  # 1804 s
