"""Which tests are `slow` (conftest.py marks them; the test files need no markers).

The fast tier (`-m "not slow"`) keeps every module's numerics: the unit and reference tests of
models, reducers, tasks, data, optimizers and checkpoints. The slow tier holds what trains:
end-to-end `trainer.run`s, tokenizer fits, subprocess runs, experiment scripts and colabs,
and the tests measured longest with `--durations` (2 CPU cores shared with other work; the
comments give seconds with a warm compile cache / a cold one), or that repeat a parity check
the fast tier already makes on another size or option.
"""
import os

# Whole files: experiment scripts, colabs, multi-process runs, and load-a-trained-run tests.
SLOW_FILES = (
    "test_experiments.py",
    "test_colabs.py",
    "test_train_processes.py",
    "test_loading.py",
    "test_video_train.py",  # video classifiers and VideoMAE pretraining that must learn
)

# Fixtures that train a run (trainer.run), fit a tokenizer or run a subprocess of
# `python -m vitoken.train`; every test that uses one (directly or through another fixture)
# is slow. Names, as in `item.fixturenames`.
TRAINED_RUN_FIXTURES = (
    "finished",  # test_train_resume: an 8-step run (`workdir` copies it)
    "ema_run",  # test_recipe: a 12-step run with EMA, states captured
    "tome_eval_run",  # test_recipe: a run evaluated with ToMe overrides
    "tokenizer_dir",  # test_beit: a k-means tokenizer fit
    "tokenizer_4px",  # test_beit, test_violet: a one-step k-means fit
    "violet_tokenizer",  # test_violet: configs/video.py:stage=tokenizer,runlocal (16 codes)
    "violet_run",  # test_violet: configs/video.py:stage=violet,runlocal (12 steps, 19 s)
    "pretrained",  # test_beit (BEiT pretraining), test_masked_modeling_train (MAE/SimMIM)
    "kmeans_run",  # test_tokenizers: a 12-step k-means fit
    "run",  # test_loading: a 4-step run (the file is slow anyway)
    "runs_by_devices",  # test_checkpoints_travel: 4-step runs on 8 devices and on 1 (subprocess)
    "vqa_encoder",  # test_visual_qa: a 120-step digit-presence encoder (runlocal)
)

# Other fixtures that take long to set up; their users are slow too.
SLOW_FIXTURES = (
    "cpu_bench",  # test_bench: configs/bench.py:cpu,tiny run through vitoken.bench (64 s setup)
)

# Single tests ("file::name": every parametrization; "file::name[id]": one; a final "*" matches
# ids by prefix), with why.
SLOW_TESTS = (
    # Short trainings that must learn (tens of steps each).
    "test_pruning_train.py::test_each_method_learns",  # 60 steps per method; dynamicvit learns
    "test_pruning_train.py::test_evit_shrink_schedule_compiles_one_train_step_per_phase",
    "test_masked_modeling_train.py::test_finetune_from_mae_learns",
    "test_tome.py::test_tome_and_dense_training_runs_both_learn",  # 2 x 200 steps
    "test_token_reduction_sweep.py::test_small_sweep_runs_end_to_end_and_resumes",  # 5 runs
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
    # The named presets' smoke runs, each config file's first one and bench.py's two tiny
    # presets (16 cases): 56 s on 2 shared cores, warm cache (all 26 SMOKE runs took 220 s).
    "test_presets.py::test_every_preset_smoke_mode_trains_and_evaluates",
    # Every ImageNet recipe's smoke runs on mock ImageNet (16 cases, each two steps, an eval and
    # a resume, dependencies trained once): 106 s on 2 shared cores, warm cache / 245 s cold.
    "test_imagenet_recipes.py::test_recipe_trains_evaluates_and_resumes",
    # Two 8-step runs each, damaged and resumed (12 s); subprocesses that measure an S/8
    # init_from's memory (22 s); a run read back with plain orbax as the README shows.
    "test_checkpoints_travel.py::test_damaged_checkpoints_are_set_aside_in_one_line",
    "test_checkpoints_travel.py::test_init_from_on_a_data_parallel_mesh_reads_the_params_once",
    "test_checkpoints_travel.py::test_the_readme_restores_a_checkpoint_with_plain_orbax",
    # `python -m vitoken.train` on a 40 MB tmpfs until its first save fails (13 s).
    "test_checkpoints_travel.py::test_a_full_disk_reads_as_one_error_on_the_command_line",
    # Two `python -m vitoken.train` subprocesses and a one-process reference run (56 s).
    "test_train_distributed.py::test_replicas_across_processes_feed_identical_rows",
    # Fits a tokenizer (fitting.fit, 4 steps): 8.0 s warm / 12.2 s cold.
    "test_tokenizers.py::test_fsq_fit_and_load_give_the_trained_codes",
    # A fresh interpreter per entry point (7 subprocesses, 15 s together warm).
    "test_layout.py::test_each_entry_point_imports_first_in_a_fresh_interpreter",
    # Measured with --durations on the fast tier, 2 CPU cores shared with other work: seconds
    # with a warm compile cache / a cold one (the cold run under a load of ~7, so the cold
    # figures are mostly compile time on a third of the machine).
    "test_lookup.py::test_lookup_runs_on_a_converted_timm_checkpoint",  # - / 111
    "test_lookup.py::test_overfits_one_batch_and_gradients_reach_both_directions",  # - / 49, trains
    "test_reducers.py::test_readme_two_stage_example_halves_the_block_update",  # 12.9 / 30
    "test_tome.py::test_no_recompilation_across_batches_and_gradients_flow",  # 12.3 / 23
    # Eager inits that only check an error message: 5.8 + 5.0 / 33 + 33.
    "test_masked_modeling.py::test_pretraining_refuses_reducers_that_change_the_token_count",
    # An eager Ti/8 init at 64 px before the error at layer 1: 6.5 / 15.4. The other cases of
    # the test stay fast.
    "test_tome.py::test_bad_tome_configs_name_the_layer_and_count[spec0-*",
    # Scan vs unrolled again under remat policies (7.9 / 18.9 and 1.4 warm, up to 18 contended);
    # the plain scan ([None]) stays.
    "test_vit.py::test_scan_equals_unrolled_layers[dots_saveable]",
    "test_vit.py::test_scan_equals_unrolled_layers[nothing_saveable]",
    # ToMe against patched timm: the capped (r16) and trending (decreasing) schedules; r8, list,
    # gap and no_prop_attn stay, and parse_r's formula is checked on its own (2.3, 1.8 warm).
    "test_tome.py::test_tome_vit_logits_equal_reference_patched_timm[r16]",
    "test_tome.py::test_tome_vit_logits_equal_reference_patched_timm[decreasing]",
    # The demo's failure path runs the whole demo (5.0 warm); the passing run stays.
    "test_demo_and_packaging.py::test_demo_fails_loudly_when_parity_is_off",
    # ToMe matching against the torch reference: two more shapes of the six (3.0, 1.7 warm);
    # unprotected, class token, class + distillation token and the capped r stay.
    "test_tome.py::test_matching_and_merge_equal_the_reference[17-4-0]",
    "test_tome.py::test_matching_and_merge_equal_the_reference[17-8-1]",
    # Converted timm weights with learned reducers: the token learner stays; the fuser and lookup
    # cases of the same converter path are slow (2.3, 4.9 warm).
    "test_convert_timm.py::test_learned_reducers_start_from_their_initialisers_on_converted_"
    "weights[reduction1-*",
    "test_convert_timm.py::test_learned_reducers_start_from_their_initialisers_on_converted_"
    "weights[reduction2-*",
    # Two registers (four stay) and ViT-S/8 at 64 px (posemb resizing has its own test): 2.7, 2.3.
    "test_convert_timm.py::test_logits_match_timm[vit_tiny_patch16_224-reg_tokens=2]",
    "test_convert_timm.py::test_logits_match_timm[vit_small_patch8_224-img_size=64]",
    # The larger timm ViTs; the tiny ones keep every conversion path.
    "test_convert_timm.py::test_logits_match_timm[vit_base_patch16_224-default]",  # 4.4 / 26.3
    "test_convert_timm.py::test_logits_match_timm[vit_base_patch32_224-default]",  # 3.5 / 19.5
    "test_convert_timm.py::test_logits_match_timm[vit_small_patch16_224-default]",  # 4.9 / 17.6
    # 2.8 / 14:
    "test_convert_timm.py::test_logits_match_timm[vit_small_patch16_224-global_pool=avg]",
)


def is_slow(nodeid: str, fixturenames) -> bool:
  """nodeid as pytest gives it ("tests/test_x.py::test_y[param]")."""
  path, _, rest = nodeid.partition("::")
  name = os.path.basename(path)
  if name in SLOW_FILES:
    return True
  if set(fixturenames) & set(TRAINED_RUN_FIXTURES + SLOW_FIXTURES):
    return True
  # An entry names a test (every parametrization), one parametrization ("...::test[id]"), or
  # those whose id starts with what precedes a final "*".
  key = f"{name}::{rest}"
  return any(key == e or key.split("[", 1)[0] == e
             or (e.endswith("*") and key.startswith(e[:-1])) for e in SLOW_TESTS)
