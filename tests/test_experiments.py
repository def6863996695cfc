"""The experiment scripts run end to end (tiny settings), so they cannot silently rot."""
import argparse
import json
import math
import os

from configs import quickstart
from experiments import (
  common,
  masked_modeling,
  token_learners,
  token_pruning,
  tome_accuracy,
  tome_benchmark,
  video,
  visual_tokens,
)
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


def test_token_learners_trains_evaluates_and_times_every_variant(tmp_path):
  token_learners.main(["--small", "--runs", "dense,tl8_loc2,lookup_multi", "--workroot",
                       str(tmp_path / "runs"), "--batch", "8", "--windows", "2", "--iters", "1",
                       "--out", str(tmp_path / "out")])
  rows = json.load(open(tmp_path / "out" / "token_learners.json"))["rows"]
  by_run = {}
  for r in rows:
    by_run.setdefault(r["run"], []).append(r)
  assert sorted(by_run) == ["dense", "lookup_multi", "tl8_loc2"]
  assert all(r["examples"] == 256 and r["img/s"] > 0 for r in rows)
  # Token counts per block follow the config: S=8 from block 2; one LookupViT model at two grids.
  assert by_run["tl8_loc2"][0]["tokens"] == "64>64>64>8>8>8>8"
  assert [r["tokens"] for r in by_run["lookup_multi"]] == ["64>16>16>16>16>16>16", "64>4>4>4>4>4>4"]
  assert by_run["tl8_loc2"][0]["FLOPs vs dense"] < 0.5
  assert os.path.exists(tmp_path / "out" / "token_learners.png")


def test_masked_modeling_pretrains_fine_tunes_probes_and_times(tmp_path):
  masked_modeling.main(["--small", "--workroot", str(tmp_path / "runs"), "--batch", "8",
                        "--windows", "2", "--iters", "1", "--out", str(tmp_path / "out")])
  result = json.load(open(tmp_path / "out" / "masked_modeling.json"))
  rows = {r["run"]: r for r in result["rows"]}
  assert list(rows) == list(masked_modeling.DOWNSTREAM)
  # Every downstream run trains the same steps; all but scratch start from a 12-step pretraining.
  assert {r["steps"] for r in rows.values()} == {12}
  assert rows["scratch"]["pretrain steps"] == 0
  assert all(rows[n]["pretrain steps"] == 12 for n in rows if n != "scratch")
  assert all(r["examples"] == 256 and 0 <= r["accuracy"] <= 1 for r in rows.values())
  # BEiT rows carry their tokenizer's codebook usage; the tokenizers have their own table.
  tokenizers = {r["tokenizer"]: r for r in result["meta"]["tokenizers"]}
  assert list(tokenizers) == list(masked_modeling.TOKENIZERS)
  for method, tokenizer in (("beit_kmeans", "tok_kmeans"), ("beit_fsq", "tok_fsq")):
    for stage in ("finetune", "probe"):
      assert rows[f"{method}_{stage}"]["codebook usage"] == tokenizers[tokenizer]["codebook usage"]
    assert 0 < tokenizers[tokenizer]["codebook usage"] <= 1 and tokenizers[tokenizer]["codes"] == 512
  assert math.isnan(rows["mae_finetune"]["codebook usage"])
  speed = {r["method"]: r for r in result["meta"]["pretraining_speed"]}
  assert sorted(speed) == ["mae", "simmim"] and all(r["img/s"] > 0 for r in speed.values())
  # MAE's encoder sees a quarter of the patches: its train step costs well under SimMIM's.
  assert speed["mae"]["train GFLOPs/img"] < 0.5 * speed["simmim"]["train GFLOPs/img"]
  for name in ("masked_modeling.png", "masked_modeling_reconstructions.png",
               "masked_modeling_beit_fsq_predictions.png", "masked_modeling.md"):
    assert os.path.exists(tmp_path / "out" / name)


def test_token_pruning_fine_tunes_evaluates_and_times_every_variant(tmp_path):
  runs = ["dense", "dense_ft", "dynamicvit70"]  # EViT's counts and numbers: tests/test_pruning.py
  token_pruning.main(["--small", "--runs", ",".join(runs), "--workroot", str(tmp_path / "runs"),
                      "--batch", "8", "--windows", "2", "--iters", "1",
                      "--out", str(tmp_path / "out")])
  rows = {r["variant"]: r for r in json.load(open(tmp_path / "out" / "token_pruning.json"))["rows"]}
  assert list(rows) == [e.label for e in token_pruning.EVALS if e.run in runs]
  assert all(r["examples"] == 256 and r["img/s"] > 0 for r in rows.values())
  # Token counts entering each block and after the last, from 64 patches plus the class token:
  # DynamicViT keeps int(64 ρ^i) at blocks 2, 4, 6; top-k ceil(0.5 n); the combination prunes
  # ceil(0.7 n) twice, then merges 4 a block from block 5.
  assert rows["dense (fine-tuned as the others)"]["tokens"] == ">".join(["65"] * 9)
  assert rows["DynamicViT ρ=0.7"]["tokens"] == "65>65>65>45>45>32>32>22>22"
  assert rows["top-k ρ=0.5 (training-free)"]["tokens"] == "65>65>65>33>33>17>17>9>9"
  assert rows["top-k ρ=0.7 at 2, 4 then ToMe r=4 (training-free)"]["tokens"] == (
      "65>65>65>46>46>33>29>25>21")
  assert all(r["FLOPs vs dense"] < 1 for name, r in rows.items() if not name.startswith("dense"))
  for name in ("token_pruning.png", "token_pruning_survivors.png", "token_pruning.md"):
    assert os.path.exists(tmp_path / "out" / name)


def test_video_trains_evaluates_and_times_every_row(tmp_path):
  rows, meta = video.main(["--small", "--workroot", str(tmp_path / "runs"), "--batch", "4",
                           "--windows", "1", "--iters", "1", "--out", str(tmp_path / "out")])
  by_run = {r["run"]: r for r in rows}
  assert list(by_run) == list(video.ROWS)
  # The tiny test split, both labels, every row timed.
  assert all(r["examples"] == 64 and r["clips/s"] > 0 for r in rows)
  assert all(0 <= r["digit (%)"] <= 100 and 0 <= r["direction (%)"] <= 100 for r in rows)
  # Token counts per block (smoke models have 2 blocks): 2 x 8 x 8 tubelets, one frame 64;
  # TokenLearner 8 per slice after block 1; ToMe's two modes on one schedule.
  assert by_run["scratch"]["tokens"] == "128>128>128"
  assert by_run["frame"]["tokens"] == "64>64>64"
  assert by_run["tl8"]["tokens"] == "128>128>16"
  assert by_run["tome_st32"]["tokens"] == by_run["tome_slice16"]["tokens"] == "128>96>64"
  assert by_run["tome_st56"]["tokens"] == by_run["tome_slice28"]["tokens"] == "128>72>36"
  assert all(r["x dense FLOPs"] < 1 for n, r in by_run.items() if n.startswith(("tl", "tome")))
  assert by_run["scratch"]["Δ direction (points)"] == 0 and by_run["scratch"]["vs"] == "scratch"
  # ToMe on the inflated params compares with the inflated run.
  assert by_run["inflated_tome_st56"]["vs"] == "inflated"
  assert by_run["inflated_tome_st56"]["tokens"] == "128>72>36"
  # Merging across time (2 slices, 2 blocks): TESTA joins the slices in block 0 and merges 12
  # patches per slice per block; TempMe runs the slices as frames (ToMe r=24 each), joins them
  # in block 1 and merges 40% before attention and 20% after. Trained or off the shelf, the
  # same schedule; the trained rows compare with the inflated run they start from.
  for name in ("inflated_testa25", "inflated_testa25_trained"):
    assert by_run[name]["tokens"] == "128>52>40"
  for name in ("inflated_tempme25", "inflated_tempme25_trained"):
    assert by_run[name]["tokens"] == "128>80>39"
  assert by_run["inflated_testa50"]["tokens"] == "128>64>64"
  assert by_run["inflated_tempme25_trained"]["vs"] == "inflated"
  assert by_run["inflated_tome60_trained"]["tokens"] == "128>68>34"
  assert meta["testa picture"]["clips"][0]["tokens"] == 40
  # Off-the-shelf rows reuse the scratch run; pretraining stays out of the rows' own time.
  assert all(by_run[n]["train s"] == 0 for n in video.OFF_THE_SHELF)
  assert set(meta["pretraining train s"]) == set(video.PRETRAINING)
  for name in ("video.json", "video.md", "video.png", "video_reconstructions.png", "video_testa.png"):
    assert os.path.exists(tmp_path / "out" / name)
  # Training again reuses every run (the same summaries, no new wall time), and every
  # evaluation is cached.
  args = argparse.Namespace(workroot=str(tmp_path / "runs"), small=True, steps=video.STEPS,
                            pretrain_steps=video.PRETRAIN_STEPS)
  again = video.train_all(args)
  assert all(again[n]["wall_time_s"] == by_run[n]["train s"] for n in video.ROWS
             if n in video.TRAINED)
  cache = common.load_json(str(tmp_path / "runs" / "evaluations.json"))
  assert set(video.ROWS) <= set(cache)


def test_visual_tokens_trains_evaluates_and_times_every_row(tmp_path):
  rows = visual_tokens.main(["--small", "--workroot", str(tmp_path / "runs"), "--batch", "4",
                             "--out", str(tmp_path / "out")])
  names = {r["row"] for r in rows}
  assert {f"{m} (training-free)" for m in visual_tokens.TRAINING_FREE} <= names
  assert {f"{m} (trained)" for m in visual_tokens.TRAINED_PER_K} <= names
  # Every row on the whole tiny test split, with per-type accuracies and a timing.
  for r in rows:
    assert r["examples"] == 256 and r["ex/s"] > 0 and r["GFLOPs/ex"] > 0, r
    assert all(0 <= r[q] <= 1 for q in visual_tokens.QTYPES), r
  full = next(r for r in rows if r["row"] == "full K")
  # Fewer visual tokens cost the LM less: every compressed row is cheaper than full K.
  assert all(r["GFLOPs/ex"] < full["GFLOPs/ex"] for r in rows if r["K"] < full["K"]
             and r["row"].split()[0] in ("cls_topk", "pool", "tome_to_k")), rows
  for name in ("visual_tokens_small.md", "visual_tokens_small.json", "visual_tokens_small.png"):
    assert os.path.exists(tmp_path / "out" / name)
