"""The experiment scripts run end to end (tiny settings), so they cannot silently rot."""
import json
import os

from configs import quickstart
from experiments import tome_accuracy, tome_benchmark
from vitoken.train import trainer


def test_tome_benchmark_writes_a_table(tmp_path):
  tome_benchmark.main(["--variants", "Ti/16", "--rs", "0,2", "--batch", "2", "--image_size", "64",
                       "--iters", "1", "--out", str(tmp_path)])
  (result,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
  rows = json.load(open(tmp_path / result))["rows"]
  assert [r["r"] for r in rows] == [0, 2] and rows[1]["GFLOPs/img"] < rows[0]["GFLOPs/img"]


def test_tome_accuracy_evaluates_a_trained_run(tmp_path):
  c = quickstart.get_config("runlocal")
  c.progress_bar = False
  trainer.run(c, str(tmp_path / "run"))
  tome_accuracy.main(["--workdir", str(tmp_path / "run"), "--rs", "0,4,4@-1,2/2", "--batch", "64",
                      "--out", str(tmp_path / "out")])
  rows = json.load(open(tmp_path / "out" / "tome_accuracy.json"))["rows"]
  assert [r["r"] for r in rows] == ["0", "4", "4@-1", "2/2"]
  assert all(r["examples"] == 256 for r in rows)
  assert rows[1]["FLOPs vs dense"] < 1 and os.path.exists(tmp_path / "out" / "tome_accuracy.png")
