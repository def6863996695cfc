"""The command line (vitoken.cli): user errors as one message, and `--config.<key>=<JSON>`
overrides of structured values for every config file."""
import importlib
import os
import re
import subprocess
import sys

import pytest

from vitoken import cli, settings
from vitoken.errors import ConfigError, MissingPathError
from vitoken.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIT = '[{"method": "evit", "keep_rate": 0.7}]'
TASK = '{"name": "distillation", "teacher": {"path": "/tmp/dense"}, "temperature": 2.0}'


def _cli(module, *args, timeout=120):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.setdefault("JAX_PLATFORMS", "cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _load(config, *overrides, reference=config_lib.override_reference):
  return cli.load_config(["prog", f"--config={config}", *overrides], reference=reference)


# ---- user errors: one message, the traceback only when asked for ------------------------------

@pytest.mark.parametrize("verbose", [False, True])
def test_a_bad_config_value_is_one_message_and_the_traceback_only_with_verbosity(tmp_path, verbose):
  out = _cli("vitoken.train", "--config=configs/quickstart.py:runlocal", f"--workdir={tmp_path}",
             "--config.progress_bar=False", "--config.model.variant=Q/16",
             *(["--verbosity=1"] if verbose else []))
  assert out.returncode == 1, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if "unknown ViT variant 'Q/16'" in l]
  if verbose:
    assert "Traceback" in out.stderr and "vitoken.errors.ConfigError" in out.stderr, out.stderr
  else:
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert errors == [out.stderr.strip().splitlines()[-1]], out.stderr[-3000:]
    assert errors[0].startswith("error: unknown ViT variant 'Q/16' (model.variant); sizes are")


@pytest.mark.parametrize("module,config", [
    ("vitoken.train", "configs/token_pruning.py:method=evit"),
    ("vitoken.tokenizers", "configs/visual_tokenizer.py:kind=fsq"),
    ("vitoken.bench", "configs/bench.py:cpu,tiny"),
])
def test_each_tool_reads_structured_overrides_and_names_a_misspelt_key(tmp_path, module, config):
  # A misspelt key fails as the command line is read, before any training or benchmarking:
  # the tool's reference (the keys the command line may add) is wired in, and the error is
  # one line.
  workdir = [] if module == "vitoken.bench" else [f"--workdir={tmp_path}"]
  out = _cli(module, f"--config={config}", *workdir, f"--config.model.token_reducton={EVIT}")
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.stderr.startswith("error: unknown config.model key 'token_reducton'; did you mean "
                               "'token_reduction'?"), out.stderr[-3000:]
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_config_file_argument_error_and_a_missing_file_are_user_errors():
  with pytest.raises(ConfigError, match=r"configs/masked_modeling.py:stage=bogus: stage must be "
                     "one of"):
    _load("configs/masked_modeling.py:stage=bogus")
  with pytest.raises(ConfigError, match="unknown config argument 'runlocl'; did you mean 'runlocal'"):
    _load("configs/quickstart.py:runlocl")
  with pytest.raises(MissingPathError, match="config file 'configs/nope.py' does not exist"):
    _load("configs/nope.py")


# ---- structured overrides -------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    "configs/quickstart.py",  # the file's model section has no token_reduction
    "configs/quickstart.py:tome=4,distill_from=/tmp/run",  # one reducer dict; a distillation task
    "configs/token_learners.py:method=learner",
    "configs/token_learners.py:method=dense",
    "configs/token_pruning.py:method=evit_tome",  # a list of reducers
    "configs/token_pruning.py:method=dynamicvit",  # a task whose teacher is None
    "configs/masked_modeling.py:stage=pretrain,method=mae",
    "configs/masked_modeling.py:stage=finetune,init=/tmp/mae,tome=4",
    "configs/visual_tokenizer.py:kind=kmeans",  # an empty model section
    "configs/visual_tokenizer.py:kind=fsq",
])
def test_token_reduction_and_task_override_every_config_file(config):
  plain = _load(config)
  c = _load(config, f"--config.model.token_reduction={EVIT}", f"--config.task={TASK}")
  assert settings.plain(c.model.token_reduction, sequences=list) == [
      {"method": "evit", "keep_rate": 0.7}]
  # The task is replaced whole: nothing of the file's task is left.
  assert c.task.to_dict() == {"name": "distillation", "teacher": {"path": "/tmp/dense"},
                              "temperature": 2.0}
  assert {k: v for k, v in c.model.items() if k != "token_reduction"} == {
      k: v for k, v in plain.model.items() if k != "token_reduction"}
  assert c.data == plain.data and c.total_steps == plain.total_steps
  assert c.is_locked
  config_lib.check_keys(c)


def test_bench_takes_a_model_token_reduction_and_its_variants_as_json():
  # vitoken.bench's reference, as its command line uses it (its config is not base_config's).
  reference = importlib.import_module("vitoken.bench.__main__")._bench_reference
  variants = '{"dense": {}, "tome_r2": {"token_reduction": {"method": "tome", "r": 2}}}'
  c = _load("configs/bench.py:cpu,tiny", f"--config.model.token_reduction={EVIT}",
            f"--config.variants={variants}", "--config.variants.tome_r2.token_reduction.r=4",
            reference=reference)
  assert settings.plain(c.model, sequences=list) == {
      "class_token": True, "token_reduction": [{"method": "evit", "keep_rate": 0.7}]}
  assert settings.plain(c.variants) == {
      "dense": {}, "tome_r2": {"token_reduction": {"method": "tome", "r": 4}}}


def test_overrides_apply_in_order_and_scalars_keep_their_types():
  c = _load("configs/quickstart.py:tome=4",
            # a key inside a section given whole is set after it
            f"--config.task={TASK}", "--config.task.temperature=3.0",
            # the second form of a flag: its value as the next argument
            "--config.model.token_reduction", '{"method": "tome", "r": 2}',
            "--config.model.token_reduction.r=6",
            # ViT fields the file left out, None-valued keys (a bare string is a string)
            "--config.model.drop_path_rate=0.1", "--config.data.folder=/data/[digits]",
            "--config.optim.clip_grad_norm=1.0", "--config.total_steps=7",
            "--config.eval_model_overrides.token_reduction=null")
  assert c.task.temperature == 3.0 and c.task.teacher.path == "/tmp/dense"
  assert settings.plain(c.model.token_reduction) == {"method": "tome", "r": 6}
  assert c.model.drop_path_rate == 0.1 and c.data.folder == "/data/[digits]"
  assert c.optim.clip_grad_norm == 1.0 and c.total_steps == 7
  assert c.eval_model_overrides.token_reduction is None
  # Python literals, as ml_collections' config_flags read sections, still work.
  c = _load("configs/quickstart.py", "--config.task={'name': 'distillation', 'hard': True}")
  assert c.task.to_dict() == {"name": "distillation", "hard": True}


@pytest.mark.parametrize("override,pattern", [
    # bad JSON names the key and shows the value
    ('--config.model.token_reduction=[{"method": "evit", keep_rate: 0.7}]',
     r"--config.model.token_reduction='\[\{\"method\": \"evit\", keep_rate: 0.7\}\]' is not "
     r"valid JSON \(Expecting property name"),
    ("--config.task={name: distillation}", r"--config.task='\{name: distillation\}' is not valid "
     "JSON"),
    ('--config.task=["distillation"]', r"config.task is a section; give a JSON object"),
    ("--config.model.varient=S/16",
     r"unknown config.model key 'varient'; did you mean 'variant'\?.*\(in --config.model.varient\)"),
    ("--config.totl_steps=3", r"unknown config key 'totl_steps'; did you mean 'total_steps'\?"),
    ("--config.task.temprature=3", r"unknown config.task key 'temprature'; allowed keys: \['name'\]"),
])
def test_bad_overrides_are_config_errors(override, pattern):
  with pytest.raises(ConfigError, match=pattern):
    _load("configs/quickstart.py", override)


def test_a_part_given_before_the_whole_is_an_error():
  with pytest.raises(ConfigError, match=re.escape(
      "--config.task.name comes before --config.task, which replaces it")):
    _load("configs/quickstart.py", "--config.task.name=mae", f"--config.task={TASK}")


def test_a_structured_override_reaches_the_run(tmp_path):
  out = _cli("vitoken.train", "--config=configs/quickstart.py:runlocal", f"--workdir={tmp_path}",
             "--config.total_steps=2", "--config.progress_bar=False",
             '--config.model.token_reduction=[{"method": "tome", "r": 2}]',
             '--config.task={"name": "classification"}', timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"reducers \(\{'method': 'tome', 'r': 2\},\)", out.stderr), out.stderr[-3000:]
  assert "summary:" in out.stdout
