"""Which tests are `slow` (conftest.py marks them; the test files need no markers).

The fast tier (`-m "not slow"`) keeps every module's numerics: the unit and reference tests of
models, reducers, tasks, data, optimizers and checkpoints. The slow tier holds what trains:
end-to-end `trainer.run`s, tokenizer fits, subprocess runs, experiment scripts and colabs,
and the individual tests measured over ~15 s (durations: `--durations` on 2 shared CPU cores,
warm compile cache; see the comments).
"""
import os

# Whole files: experiment scripts, colabs, multi-process runs, and load-a-trained-run tests.
SLOW_FILES = (
    "test_experiments.py",
    "test_colabs.py",
    "test_train_processes.py",
    "test_loading.py",
)

# Fixtures that train a run (trainer.run), fit a tokenizer or run a subprocess of
# `python -m vitoken.train`; every test that uses one (directly or through another fixture)
# is slow. Names, as in `item.fixturenames`.
TRAINED_RUN_FIXTURES = (
    "finished",  # test_train_resume: an 8-step run (`workdir` copies it)
    "ema_run",  # test_recipe: a 12-step run with EMA, states captured
    "tome_eval_run",  # test_recipe: a run evaluated with ToMe overrides
    "tokenizer_dir",  # test_beit: a k-means tokenizer fit
    "tokenizer_4px",  # test_beit: a one-step k-means fit
    "pretrained",  # test_beit (BEiT pretraining), test_masked_modeling_train (MAE/SimMIM)
    "kmeans_run",  # test_tokenizers: a 12-step k-means fit
    "run",  # test_loading: a 4-step run (the file is slow anyway)
)

# Single tests ("file::name", any parametrization), with why.
SLOW_TESTS = (
    # Short trainings that must learn (tens of steps each).
    "test_pruning_train.py::test_each_method_learns",  # 60 steps per method; dynamicvit learns
    "test_pruning_train.py::test_evit_shrink_schedule_compiles_one_train_step_per_phase",
    "test_masked_modeling_train.py::test_finetune_from_mae_learns",
    "test_tome.py::test_tome_and_dense_training_runs_both_learn",  # 2 x 200 steps
    "test_token_learner.py::test_trainer_runs_learn",  # 80 steps per variant
    "test_lookup.py::test_trainer_runs_lookup_with_training_grids",
    # End-to-end trainer runs (compile + steps + eval + checkpoints each).
    "test_train_loop.py::test_smoke_run_writes_everything",
    "test_train_loop.py::test_meshes_give_the_single_device_loss_curve",
    "test_train_loop.py::test_resume_continues_and_matches_uninterrupted_run",
    "test_train_loop.py::test_grad_accumulation_matches_one_big_batch",
    "test_train_loop.py::test_ema_is_evaluated",
    "test_train_loop.py::test_init_from_copies_params_except_excluded_and_resizes_posemb",
    "test_train_loop.py::test_corrupt_latest_checkpoint_falls_back_and_says_so",
    "test_train_loop.py::test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint",
    "test_tasks.py::test_label_free_task_trains_checkpoints_and_resumes_exactly",
    "test_tasks.py::test_distillation_from_a_teacher_workdir",
    "test_tasks.py::test_teacher_that_does_not_fit_is_named",
    "test_tasks.py::test_training_step_and_progress_reach_the_reducers",
    "test_paths.py::test_training_resume_and_init_from_in_a_bucket",
    "test_paths.py::test_unreadable_checkpoint_in_a_bucket_is_set_aside",
    "test_train_distributed.py::test_trainer_refuses_a_workdir_another_process_zero_writes",
)


def is_slow(nodeid: str, fixturenames) -> bool:
  """nodeid as pytest gives it ("tests/test_x.py::test_y[param]")."""
  path, _, rest = nodeid.partition("::")
  name = os.path.basename(path)
  if name in SLOW_FILES:
    return True
  if set(fixturenames) & set(TRAINED_RUN_FIXTURES):
    return True
  test = rest.split("[", 1)[0]
  return f"{name}::{test}" in SLOW_TESTS
