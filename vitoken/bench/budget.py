"""Budget picker: the least aggressive training-free setting that meets a cost target.

  python -m vitoken.bench.budget --workdir=RUN --flops=0.5     # FLOPs <= 0.5 x dense
  python -m vitoken.bench.budget --workdir=RUN --speedup=1.5   # inference >= 1.5x dense, here

Given a trained dense run, `pick` searches each method's settings, least aggressive first:
ToMe's r at a constant schedule and at the reference's decreasing one (`inflection=-1`), r up
to half the image tokens (what the first layer allows; proportional attention on, as off the
shelf), and top-k's keep rate on a grid at its default blocks. Costs are those
`python -m vitoken.bench` reports: the analytic FLOPs (`vitoken.bench.flops`) and images/s
from its interleaved timer (`vitoken.bench.core`). FLOPs fall monotonically as a setting gets
more aggressive, and each setting is its own compiled program, so a FLOPs target is a binary
search over shapes alone (nothing compiles); a speed target times, interleaved with dense,
only the few settings whose FLOPs are nearest to 1/speed-up, moving the window until the
least aggressive setting meeting it is found. The chosen settings and dense are then
evaluated on the run's eval split (top-1 accuracy).
"""
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vitoken import cli
from vitoken.bench import core, flops as flops_lib
from vitoken.data import pipeline
from vitoken.engine.metrics import quiet_libraries
from vitoken.errors import ConfigError
from vitoken.tasks import runs

METHODS = ("tome", "topk")
TOPK_KEEP_RATES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


@dataclasses.dataclass
class Candidate:
  """One setting tried: its `token_reduction` (None: dense) and what it costs."""
  label: str
  setting: Optional[Dict[str, Any]]
  tokens: str
  gflops: float  # analytic forward GFLOPs per image, as vitoken.bench reports
  flops_fraction: float  # of dense
  images_per_s: Optional[float] = None  # timed only for a speed target
  speedup: Optional[float] = None  # over dense, timed in the same interleaved run
  meets: Optional[bool] = None


@dataclasses.dataclass
class Pick:
  """A method's least aggressive setting meeting the target (None, with `why`, if none)."""
  family: str
  chosen: Optional[Candidate]
  tried: List[Candidate]
  accuracy: Optional[float] = None
  why: str = ""


@dataclasses.dataclass
class Budget:
  target: str
  dense: Candidate
  dense_accuracy: float
  examples: int
  picks: List[Pick]
  meta: Dict[str, Any]

  def rows(self) -> List[Dict[str, Any]]:
    """One row per pick, dense first: the fields `markdown` prints."""
    out = [_row("dense", self.dense, self.dense_accuracy, self.dense_accuracy)]
    for p in self.picks:
      out.append(_row(p.family, p.chosen, p.accuracy, self.dense_accuracy, p.why))
    return out


def _row(family, c: Optional[Candidate], acc, dense_acc, why="") -> Dict[str, Any]:
  if c is None:
    return {"method": family, "setting": why}
  return {"method": family, "setting": c.label, "tokens": c.tokens, "GFLOPs/img": c.gflops,
          "x dense FLOPs": c.flops_fraction, "x dense img/s": c.speedup, "accuracy": acc,
          "Δ acc (points)": None if acc is None else 100 * (acc - dense_acc)}


@dataclasses.dataclass
class _Family:
  """A method's settings, least aggressive first."""
  name: str
  values: Sequence[Any]
  setting: Callable[[Any], Dict[str, Any]]
  label: Callable[[Any], str]


def families(methods: Sequence[str], num_patches: int,
             keep_rates: Sequence[float] = TOPK_KEEP_RATES) -> List[_Family]:
  """The search spaces of `methods`. ToMe's r stops at half the image tokens: the first layer
  can merge no more (a constant r beyond it is refused; later layers cap it themselves)."""
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ConfigError(f"budget: methods must be among {METHODS} (training-free), "
                      f"got {list(methods)}")
  rs = range(1, num_patches // 2 + 1)
  out = []
  for method in methods:
    if method == "tome":
      out.append(_Family("tome", rs, lambda r: {"method": "tome", "r": r, "prop_attn": True},
                         lambda r: f"r={r}"))
      decreasing = {"method": "tome", "inflection": -1.0, "prop_attn": True}
      out.append(_Family("tome decreasing", rs, lambda r: {**decreasing, "r": r},
                         lambda r: f"r={r}@-1"))
    else:
      rates = sorted({float(v) for v in keep_rates}, reverse=True)
      out.append(_Family("topk", rates, lambda k: {"method": "topk", "keep_rate": k},
                         lambda k: f"keep={k:g}"))
  return out


def accuracy(model, params, data_config, *, batch_size: int = 256) -> Tuple[float, int]:
  """(top-1 accuracy, examples) of `model` over the whole eval split of `data_config`."""
  return predict_accuracy(jax.jit(lambda x: model.apply({"params": params}, x)[0]), data_config,
                          batch_size=batch_size)


def predict_accuracy(predict, data_config, *, batch_size: int = 256) -> Tuple[float, int]:
  """(top-1 accuracy, examples) of `predict(images) -> logits` over the whole eval split of
  `data_config`, padded batches masked out, as the trainer's eval counts them. With several
  label keys (a head each), the mean of the keys' accuracies, as the classification task's."""
  splits = [n for _, n in pipeline.dataset_info(data_config).label_splits()]
  bounds = np.cumsum([0] + splits)
  correct = total = 0
  for b in pipeline.eval_iterator(data_config, global_batch_size=batch_size):
    logits = np.asarray(predict(b["image"]))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      pred, label = logits[:, lo:hi].argmax(-1), b["labels"][:, lo:hi].argmax(-1)
      correct += int(((pred == label) & b["mask"]).sum()) / len(splits)
    total += int(b["mask"].sum())
  return correct / max(total, 1), total


def pick(workdir: str, *, flops_fraction: Optional[float] = None, speedup: Optional[float] = None,
         methods: Sequence[str] = METHODS, eval_examples: Optional[int] = None,
         batch_size: int = 256, time_batch: Optional[int] = None,
         keep_rates: Sequence[float] = TOPK_KEEP_RATES, time_window: int = 3, max_rounds: int = 3,
         windows: int = 5, iters: int = 5, warmup: int = 2,
         model_overrides: Optional[Dict[str, Any]] = None) -> Budget:
  """For each method, the least aggressive training-free setting of the dense run in `workdir`
  whose analytic FLOPs are at most `flops_fraction` x dense, or whose measured inference
  speed-up over dense (batches of `time_batch`, default `batch_size`) is at least `speedup`;
  with its accuracy and dense's on the run's eval split (capped at `eval_examples`).

  A speed target times `time_window` settings per method at a time, at most `max_rounds`
  times, with the bench's `windows` x `iters` timer. `model_overrides` change how the run's
  model runs, as `vitoken.load`'s do (e.g. dtype="bfloat16"). A ConfigError when no method has
  a setting meeting the target.
  """
  if (flops_fraction is None) == (speedup is None):
    raise ConfigError("budget: give exactly one target, a FLOPs fraction (e.g. 0.5) or a speed-up "
                      "(e.g. 1.5)")
  if flops_fraction is not None and not 0.0 < flops_fraction < 1.0:
    raise ConfigError(f"budget: the FLOPs fraction must be in (0, 1), got {flops_fraction} "
                      "(dense itself is 1)")
  if speedup is not None and not speedup > 1.0:
    raise ConfigError(f"budget: the speed-up must be over 1 (dense itself is 1), got {speedup}")
  overrides = {**(model_overrides or {}), "token_reduction": None}
  # vitoken.load's own path (vitoken.loading sits a floor above the bench).
  model, params, config = runs.load_model(workdir, model_overrides=overrides)
  own = config.model.get("token_reduction")
  size = int(config.data.image_size)
  images = jax.ShapeDtypeStruct((1, size, size, model.channels), jnp.float32)
  num_patches = model.patch_grid((size, size)).num_patches
  fams = families(methods, num_patches, keep_rates)

  def cost(label, setting):
    m = model.clone(token_reduction=setting)
    s = flops_lib.summary(m, params, images)
    return Candidate(label, setting, s["tokens"], s["analytic GFLOPs/img"], 0.0)

  dense = cost("dense", None)
  dense.flops_fraction = 1.0
  searches = []
  for fam in fams:
    memo: Dict[int, Candidate] = {}

    def at(i, fam=fam, memo=memo):
      if i not in memo:
        memo[i] = cost(fam.label(fam.values[i]), fam.setting(fam.values[i]))
        memo[i].flops_fraction = memo[i].gflops / dense.gflops
      return memo[i]
    # FLOPs are monotone in each family, so the first setting under a fraction is a bisection.
    bound = flops_fraction if flops_fraction is not None else 1.0 / speedup
    first = _first_at_most(len(fam.values), lambda i, at=at: at(i).flops_fraction, bound)
    searches.append((fam, at, memo, first))

  batch = time_batch or batch_size
  if flops_fraction is not None:
    picks = []
    for fam, at, memo, first in searches:
      for c in memo.values():
        c.meets = c.flops_fraction <= flops_fraction
      tried = [memo[i] for i in sorted(memo)]
      if first is None:
        why = (f"not reachable: the most aggressive ({tried[-1].label}) leaves "
               f"{tried[-1].flops_fraction:.3g} x dense FLOPs")
        picks.append(Pick(fam.name, None, tried, why=why))
      else:
        picks.append(Pick(fam.name, at(first), tried))
    target = f"analytic FLOPs <= {flops_fraction:g} x dense"
  else:
    picks = _speed_picks(model, params, dense, searches, speedup, batch=batch, size=size,
                         time_window=time_window, max_rounds=max_rounds, windows=windows,
                         iters=iters, warmup=warmup)
    target = f"inference speed-up >= {speedup:g}x dense (batch {batch}, {_device()})"

  if all(p.chosen is None for p in picks):
    raise ConfigError(f"budget: no setting of {list(methods)} meets {target}: "
                      + "; ".join(f"{p.family} {p.why}" for p in picks))

  data = config.data.copy_and_resolve_references()
  if eval_examples is not None:
    with data.unlocked():
      cap = data.get("eval_examples")
      data.eval_examples = int(eval_examples) if cap is None else min(int(eval_examples), cap)
  dense_acc, examples = accuracy(model, params, data, batch_size=batch_size)
  for p in picks:
    if p.chosen is not None:
      p.accuracy, _ = accuracy(model.clone(token_reduction=p.chosen.setting), params, data,
                               batch_size=batch_size)
  meta = {"workdir": str(workdir), "device": _device(), "eval examples": examples,
          "flops": "analytic forward matmuls per image (vitoken.bench.flops), 2 per multiply-add",
          "run's own token_reduction (replaced)": own}
  return Budget(target, dense, dense_acc, examples, picks, meta)


def _first_at_most(n: int, value: Callable[[int], float], bound: float) -> Optional[int]:
  """The least i with value(i) <= bound, for value non-increasing in i (None if none)."""
  if n == 0 or value(n - 1) > bound:
    return None
  lo, hi = 0, n - 1
  while lo < hi:
    mid = (lo + hi) // 2
    if value(mid) <= bound:
      hi = mid
    else:
      lo = mid + 1
  return lo


def _next_window(n: int, measured: Dict[int, float], target: float, boundary: int,
                 width: int) -> List[int]:
  """The settings to time next, or [] once the least aggressive one meeting the target is
  bracketed (it meets and the one before it was timed short of it, or it is the first)."""
  if not measured:
    start = max(min(boundary - 1, n - width), 0)  # one less aggressive than FLOPs suggest
    return list(range(start, min(start + width, n)))
  meeting = [i for i, s in measured.items() if s >= target]
  if meeting:
    i = min(meeting)
    if i == 0 or i - 1 in measured:
      return []
    return [j for j in range(max(i - width, 0), i) if j not in measured]
  last = max(measured)
  return list(range(last + 1, min(last + 1 + width, n)))


def _speed_picks(model, params, dense, searches, target, *, batch, size, time_window,
                 max_rounds, windows, iters, warmup) -> List[Pick]:
  # The bench's own compiled case, so candidates run exactly as its inference rows do.
  case = core.TimedProgram
  channels = model.channels
  compiled = {"dense": case(model, params, "inference", batch, size, channels)}
  measured: List[Dict[int, float]] = [{} for _ in searches]
  # With no setting under 1/speed-up in FLOPs, start from the most aggressive ones.
  boundaries = [len(f.values) - 1 if first is None else first for f, _, _, first in searches]
  for _ in range(max_rounds):
    todo = {k: _next_window(len(f.values), measured[k], target, boundaries[k], time_window)
            for k, (f, _, _, _) in enumerate(searches)}
    if not any(todo.values()):
      break
    fns = {"dense": compiled["dense"].run}
    for k, idx in todo.items():
      at = searches[k][1]
      for i in idx:
        key = _program_key(at(i))
        if key not in compiled:
          compiled[key] = case(model.clone(token_reduction=at(i).setting), params, "inference",
                               batch, size, channels)
        fns[key] = compiled[key].run
    speed = core.interleaved_throughput(fns, batch=batch, windows=windows, iters=iters,
                                        warmup=warmup)
    dense.images_per_s = speed["dense"]["median"]
    dense.speedup = 1.0
    for k, idx in todo.items():
      at = searches[k][1]
      for i in idx:
        c = at(i)
        c.images_per_s = speed[_program_key(c)]["median"]
        c.speedup = c.images_per_s / dense.images_per_s
        c.meets = c.speedup >= target
        measured[k][i] = c.speedup
  picks = []
  for k, (fam, at, memo, _) in enumerate(searches):
    tried = [memo[i] for i in sorted(memo)]
    meeting = [i for i, s in measured[k].items() if s >= target]
    if meeting:
      picks.append(Pick(fam.name, at(min(meeting)), tried))
    else:
      best = max(measured[k].values(), default=float("nan"))
      picks.append(Pick(fam.name, None, tried,
                        why=f"not reached: the fastest timed setting ran {best:.3g}x dense"))
  return picks


def _program_key(c: Candidate) -> str:
  # Settings a layer's cap makes alike (ToMe's r past what the tokens allow, constant or
  # decreasing) run the same program: time it once, so noise cannot rank them apart.
  return f"{c.setting['method']}:{c.tokens}"


def _device() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')}"


COLUMNS = ("method", "setting", "tokens", "GFLOPs/img", "x dense FLOPs", "x dense img/s",
           "accuracy", "Δ acc (points)")


def markdown(result: Budget) -> str:
  """The picks (dense first) as a markdown table."""
  def cell(row, col):
    v = row.get(col)
    if v is None:
      return "-"
    if isinstance(v, float):
      if col == "accuracy":
        return f"{v:.2%}"
      return f"{v:+.2f}" if col.startswith("Δ") else f"{v:.3g}"
    return str(v)
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in result.rows()]
  return "\n".join(lines)


def tried_lines(result: Budget) -> List[str]:
  """Per method, the settings tried: label, FLOPs fraction and (timed ones) speed-up."""
  def one(c):
    speed = "" if c.speedup is None else f", {c.speedup:.2f}x img/s"
    return f"{c.label} ({c.flops_fraction:.3f} FLOPs{speed})"
  return [f"{p.family}: " + ", ".join(one(c) for c in p.tried) for p in result.picks]


def main(argv):
  f = flags.FLAGS
  if len(argv) > 1:
    raise ConfigError(f"budget: unexpected arguments {argv[1:]}")
  if not f.workdir:
    raise ConfigError("budget: --workdir (a trained dense run) is required")
  quiet_libraries(False)
  result = pick(f.workdir, flops_fraction=f.flops, speedup=f.speedup, methods=tuple(f.methods),
                eval_examples=f.eval_examples, batch_size=f.batch_size, time_batch=f.time_batch)
  print(f"target: {result.target}; accuracy on {result.examples} eval examples")
  print(markdown(result))
  print("\n".join(tried_lines(result)))


def _define_flags():
  # Defined when run, not at import: importing the module must not claim names like --workdir.
  flags.DEFINE_string("workdir", None, "a trained dense run (vitoken.train's workdir)")
  flags.DEFINE_float("flops", None, "target: analytic FLOPs at most this fraction of dense")
  flags.DEFINE_float("speedup", None, "target: inference images/s at least this x dense, here")
  flags.DEFINE_list("methods", list(METHODS), f"methods to search, among {METHODS}")
  flags.DEFINE_integer("eval_examples", None, "cap on the eval split (default: all of it)")
  flags.DEFINE_integer("batch_size", 256, "eval batch size (and timed batch by default)")
  flags.DEFINE_integer("time_batch", None, "timed batch size for --speedup")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
