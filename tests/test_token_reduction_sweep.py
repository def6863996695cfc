"""The token-reduction sweep: its plan, its budgets as configs, its frontier, and a small run
end to end that resumes without training again."""
import json
import os

import pytest

from configs import token_reduction_sweep as sweep_configs
from experiments import token_reduction_sweep as sweep
from vitoken.errors import ConfigError


def test_plan_takes_methods_and_budgets():
  rows = sweep.plan(["dense", "tome_off", "evit", "mae_tome"], ["0.7"])
  assert [(r.method, r.budget) for r in rows] == [
      ("dense", "1"), ("tome_off", "0.7"), ("evit", "0.7"),
      # MAE's own dense fine-tune stays: it is the family's reference, not a budget.
      ("mae_tome", "1"), ("mae_tome", "0.7")]
  every = sweep.plan(sweep.METHODS, None)
  assert {r.method for r in every} == set(sweep.METHODS)
  # Every method at two or three budgets (MAE: two, plus its dense fine-tune).
  for method in sweep.BUDGETS:
    assert len([r for r in every if r.method == method and r.budget != "1"]) in (2, 3), method


def test_every_row_has_its_own_run_and_a_config_that_builds(tmp_path):
  rows = sweep.plan(sweep.METHODS, None)
  trained = {}
  for row in rows:
    for seed in (0, 1):
      name = row.run(seed)
      if row.method in sweep.TRAINING_FREE or row.method == "dense":
        assert name == f"dense_ft_s{seed}"  # applied to the fine-tuned dense params
        continue
      assert name not in trained, (name, row, trained.get(name))
      trained[name] = row
      c = sweep_configs.get_config(row.run_arg(str(tmp_path), seed))
      assert c.seed == seed and c.init_from.path
      assert c.total_steps == (sweep_configs.MAE_FINETUNE_STEPS if row.method == "mae_tome"
                               else sweep_configs.FINETUNE_STEPS)
  base = sweep_configs.get_config("method=dense")
  assert base.total_steps == sweep_configs.BASE_STEPS and not base.init_from.path
  assert base.model.pool_type == "tok"  # a class token, so that every method applies


@pytest.mark.parametrize("arg, message", [
    ("method=evit", "pass init="),
    ("method=mae_pretrain,init=/x", "takes no init"),
    ("method=nope", "method must be one of"),
    ("method=evit,init=/x,teacher=/y", "teacher and backbone_lr are for method=dynamicvit"),
])
def test_config_errors_name_the_fix(arg, message):
  with pytest.raises((ValueError, ConfigError), match=message):
    sweep_configs.get_config(arg)


def test_method_new_parameters_start_fresh_and_dynamicvit_has_its_teacher():
  c = sweep_configs.get_config("method=token_fuser,init=/d")
  assert c.init_from.exclude == r"(^|/)token_learner/" and c.model.token_reduction.mode == "fuser"
  c = sweep_configs.get_config("method=dynamicvit,keep=0.5,init=/d")
  assert c.task.teacher.path == "/d" and c.init_from.exclude == r"(^|/)dynamicvit/"
  c = sweep_configs.get_config("method=mae,r=0,init=/m")
  assert "token_reduction" not in c.model and c.init_from.subtree == "encoder"


def test_pareto_front_keeps_only_undominated_points():
  points = [(1.0, 90.0), (2.0, 91.0), (3.0, 85.0), (2.5, 89.0), (4.0, 80.0), (3.5, 84.0),
            (2.0, 88.0)]
  assert sweep.pareto_front(points) == [(2.0, 91.0), (2.5, 89.0), (3.0, 85.0), (3.5, 84.0),
                                        (4.0, 80.0)]
  # A point beaten in both speed and accuracy never joins; ties in speed keep the better one.
  assert (1.0, 90.0) not in sweep.pareto_front(points)


def test_best_rows_are_each_family_most_accurate_reduced_row():
  rows = sweep.plan(["dense", "tome_off", "tome", "evit", "topk", "mae_tome"], None)
  acc = {r: 0.5 for r in rows}
  best_merge = next(r for r in rows if r.method == "tome" and r.budget == "0.5")
  best_prune = next(r for r in rows if r.method == "topk" and r.budget == "low")
  mae_dense = next(r for r in rows if r.method == "mae_tome" and r.budget == "1")
  acc.update({best_merge: 0.9, best_prune: 0.8, mae_dense: 0.99, rows[0]: 1.0})
  best = sweep._best_rows(rows, acc)  # pylint: disable=protected-access
  assert best_merge in best and best_prune in best
  # Neither dense nor MAE's dense fine-tune is a reduced row.
  assert rows[0] not in best and mae_dense not in best
  assert {r.family for r in best} == {"merging", "pruning", "masked modeling"}


def test_small_sweep_runs_end_to_end_and_resumes(tmp_path):
  args = ["--small", "--workroot", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
          "--methods", "dense,tome_off,evit", "--budgets", "0.7", "--seeds", "2",
          "--batch", "8", "--windows", "2", "--iters", "1"]
  rows, meta = sweep.main(args)
  assert [(r["method"], r["budget"]) for r in rows] == [
      ("dense", "1"), ("tome_off", "0.7"), ("evit", "0.7")]
  # Dense and each family's best row have two seeds: ToMe off the shelf over both dense
  # fine-tunes, EViT fine-tuned twice.
  assert [r["seeds"] for r in rows] == [[0, 1], [0, 1], [0, 1]]
  for r in rows:
    assert r["examples"] == 256 and all(0 <= a <= 1 for a in r["accuracies"])
    assert r["inference img/s"] > 0 and r["train img/s"] > 0
    assert r["XLA GFLOPs/img"] > 0 and r["analytic GFLOPs/img"] > 0
  dense, tome, evit = rows
  assert tome["XLA GFLOPs/img"] < 0.8 * dense["XLA GFLOPs/img"]
  assert evit["tokens"] == "65>65>65>47>35>26>26"
  assert tome["train wall s"] == 0.0 and evit["train wall s"] > 0
  for name in ("sweep.json", "sweep.md", "sweep.png"):
    assert os.path.getsize(tmp_path / "out" / name) > 0
  assert "| EViT | keep=0.7 | 2 |" in (tmp_path / "out" / "sweep.md").read_text()
  assert json.load(open(tmp_path / "out" / "sweep.json"))["meta"]["device"] == meta["device"]

  # A second call reuses every run and evaluation: no training step is logged again.
  logs = {d: (tmp_path / "runs" / d / "metrics.jsonl").read_text()
          for d in os.listdir(tmp_path / "runs") if (tmp_path / "runs" / d).is_dir()}
  assert sorted(logs) == ["dense", "dense_ft_s0", "dense_ft_s1", "evit_keep0.7_s0",
                          "evit_keep0.7_s1"]
  again, _ = sweep.main(args)
  assert [r["accuracies"] for r in again] == [r["accuracies"] for r in rows]
  for d, text in logs.items():
    assert (tmp_path / "runs" / d / "metrics.jsonl").read_text() == text, d


def test_learned_map_statistics_tell_spread_and_redundant_maps():
  import numpy as np  # pylint: disable=import-outside-toplevel

  from experiments import paper_gaps  # pylint: disable=import-outside-toplevel
  n = 64
  uniform = np.full((2, 4, n), 1.0 / n)
  stats = paper_gaps.map_statistics(uniform)
  assert abs(stats["map entropy (nats)"] - np.log(n)) < 1e-9
  assert abs(stats["map cosine (between tokens)"] - 1.0) < 1e-9  # all maps the same
  # Four tokens, each on its own patch: no spread, no overlap.
  one_hot = np.zeros((2, 4, n))
  one_hot[:, np.arange(4), np.arange(4) * 7] = 1.0
  stats = paper_gaps.map_statistics(one_hot)
  assert stats["map entropy (nats)"] < 1e-9 and stats["map cosine (between tokens)"] < 1e-9
  assert stats["token pairs with cosine > 0.9"] == 0.0
