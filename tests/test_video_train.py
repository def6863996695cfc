"""Video trainings learn (configs/video.py on moving_digits/tiny): the dense video classifier
reads the direction of motion far above chance and both accuracies are reported; VideoMAE's
reconstruction loss falls and its pretraining resumes with the same masks; a one-frame model
cannot read the direction as the video model does."""
import numpy as np
import pytest

from configs import video
from tests.test_train_loop import losses, override
from vitoken.engine.metrics import read_jsonl
from vitoken.train import trainer


def video_config(arg: str, **overrides):
  c = video.get_config(f"{arg},runlocal")
  c.progress_bar = False
  c.checkpoint.async_save = False
  return override(c, **overrides)


def evals(workdir):
  return [r for r in read_jsonl(f"{workdir}/metrics.jsonl") if r["split"] == "eval"]


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
  """{"video", "frame"}: 150-step runs on the tiny split (batch 32, 200 clips), evaluated."""
  runs = {}
  for name, arg in (("video", "stage=scratch"), ("frame", "stage=frame")):
    workdir = str(tmp_path_factory.mktemp(name))
    config = video_config(arg, total_steps=150, eval_every_steps=150, **{
        "checkpoint.every_steps": 150, "schedule.warmup_steps": 10, "optim.lr": 3e-3})
    runs[name] = (workdir, trainer.run(config, workdir))
  return runs


def test_video_classifier_learns_the_direction_and_reports_both_labels(classifiers):
  workdir, summary = classifiers["video"]
  last = evals(workdir)[-1]
  assert last["examples"] == 64
  # Chance is 1/8 for the direction: a video model sees the motion.
  assert last["accuracy/direction"] >= 0.5, last
  assert 0 <= last["accuracy/label"] <= 1
  assert np.isclose(last["accuracy"], (last["accuracy/direction"] + last["accuracy/label"]) / 2)
  train = losses(workdir, key="loss/ce/direction")
  assert np.mean(train[-3:]) < 0.5 * np.mean(train[:3]), train
  assert summary["final_step"] == 150


def test_one_middle_frame_reads_the_direction_worse_than_the_clip(classifiers):
  video_eval = evals(classifiers["video"][0])[-1]
  frame_eval = evals(classifiers["frame"][0])[-1]
  assert frame_eval["accuracy/direction"] < video_eval["accuracy/direction"] - 0.2, (
      frame_eval, video_eval)


def test_videomae_pretraining_loss_falls_and_resumes_exactly(tmp_path):
  steps = dict(total_steps=60, eval_every_steps=60, **{"checkpoint.every_steps": 30,
                                                       "schedule.warmup_steps": 5})
  workdir = str(tmp_path / "videomae")
  trainer.run(video_config("stage=pretrain", **steps), workdir)
  train = losses(workdir)
  assert np.mean(train[-3:]) < 0.9 * np.mean(train[:3]), train
  # Masked share: int(0.9 * 64) = 57 of the 64 positions of each time slice.
  shares = losses(workdir, key="masked_share")
  assert np.allclose(shares, 57 / 64)

  # Resume from step 30: the same batches and masks give the same losses.
  import shutil  # pylint: disable=import-outside-toplevel
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(f"{resumed}/checkpoints/60")
  (tmp_path / "resumed" / "metrics.jsonl").write_text("")
  trainer.run(video_config("stage=pretrain", **steps), resumed)
  again = [r for r in read_jsonl(f"{resumed}/metrics.jsonl") if r["split"] == "train"]
  first = {r["step"]: r["loss"] for r in read_jsonl(f"{workdir}/metrics.jsonl")
           if r["split"] == "train"}
  assert again and all(np.isclose(r["loss"], first[r["step"]], rtol=1e-5) for r in again)
