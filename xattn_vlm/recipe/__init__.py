"""The miniature Flamingo recipe end to end: three training stages, evaluation and a report.

``run(config, workdir)`` takes a recipe config (``experiments/shapes_tiny.py``: ``stages`` holds
the trainer config of each stage, ``eval`` the evaluation's) and, in ``workdir``:

1. trains ``lm_pretrain``, ``vision_pretrain`` and ``flamingo`` with the one trainer, each in
   ``<workdir>/<stage>``, the Flamingo stage loading both towers from the first two (a rerun
   resumes each stage from its checkpoints, and skips a finished one);
2. evaluates the trained model with ``xattn_vlm.eval.runner`` into ``<workdir>/eval``, and the
   tasks of ``baseline_tasks`` also with the Flamingo stage's starting point (pretrained towers,
   gates at 0, so the frozen LM alone) into ``<workdir>/eval_untrained``;
3. measures whether the trained model uses its images (``diagnostics.image_reliance``: VQA
   answers scored with each question's own image and with another's);
4. writes the report (``report.write``): ``report.md``, ``report.png`` and ``grid.png``, plus
   ``recipe.json`` with every number in it.

With several ``seeds`` (``config.seeds``, or ``run``'s argument), each seed runs all of the above
in ``<workdir>/seed_<s>`` (its stages' ``seed`` and ``data.seed`` set to it), and ``workdir``
gets a combined ``report.md`` and ``recipe.json``: every seed's figures, their mean ± std across
seeds and the targets judged over the seeds (``report.write_seeds``). One seed runs in
``workdir`` itself.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import ml_collections
from flax import nnx

from xattn_vlm import console
from xattn_vlm import lock
from xattn_vlm.eval import results as results_lib
from xattn_vlm.eval import runner
from xattn_vlm.inference import Processor
from xattn_vlm.models import convert
from xattn_vlm.models import gguf_file
from xattn_vlm.recipe import diagnostics
from xattn_vlm.recipe import report
from xattn_vlm.train import input_pipeline
from xattn_vlm.train import stages
from xattn_vlm.train import trainer
from xattn_vlm.train.configs import STAGES

_log = logging.getLogger(__name__)

SUMMARY = "recipe.json"


def stage_config(config: ml_collections.ConfigDict, stage: str,
                 workdir: pathlib.Path, seed: int | None = None) -> ml_collections.ConfigDict:
  """The trainer config of ``stage`` with the Flamingo stage's towers read from this run, and
  with ``seed`` (when given) as its initialisation and data seed."""
  if stage not in config.stages or "flamingo" not in config.stages:
    raise ValueError(f"config.stages: expected the flamingo stage and any of {STAGES[:-1]} "
                     f"before it, got {sorted(config.stages)}")
  stage_cfg = ml_collections.ConfigDict(config.stages[stage].to_dict())
  if seed is not None:
    stage_cfg.seed = stage_cfg.data.seed = seed
  if stage == "flamingo":
    # A tower pretrained by this run comes from its stage's folder; one without a stage here
    # keeps the config's source (e.g. init.lm_hf_path: a published LM file).
    for tower in ("lm", "vision"):
      if f"{tower}_pretrain" in config.stages:
        stage_cfg.init[f"{tower}_workdir"] = str(workdir / f"{tower}_pretrain")
  return stage_cfg


def recipe_stages(config: ml_collections.ConfigDict) -> list[str]:
  """The stages this recipe trains, in the trainer's order."""
  return [stage for stage in STAGES if stage in config.stages]


def check(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """What can fail before any training step does, here: every stage's config, the Flamingo
  stage's tokenizer against its model (vocabulary and ``<image>``/``<|endofchunk|>`` ids) and a
  pretrained LM file against ``config.model.lm``, so a missing or damaged file or a disagreeing
  token id is named at start, not after the first stages have trained."""
  for stage in recipe_stages(config):
    trainer.check_config(stage_config(config, stage, workdir))
  flamingo = stage_config(config, "flamingo", workdir)
  input_pipeline.tokenizer_for(flamingo)
  if flamingo.init.lm_hf_path:
    path = flamingo.init.lm_hf_path
    stored = convert.read_lm_config(path)
    gguf_file.check_lm_config(flamingo.model.lm, stored, path)


def stage_model(config: ml_collections.ConfigDict, params: nnx.State) -> nnx.Module:
  """A train state's parameters as its stage's model (``config.stage``; built abstractly,
  nothing initialised) to evaluate and diagnose."""
  build = stages.get_stage(config.stage).build_model
  abstract = nnx.eval_shape(lambda: build(config, nnx.Rngs(0)))
  graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
  return nnx.merge(graphdef, params, rest)


def parse_seeds(value: Any, setting: str = "seeds") -> tuple[int, ...]:
  """Seeds from a sequence of integers or a comma-separated string ("0,1,2"): distinct, >= 0."""
  items = value.split(",") if isinstance(value, str) else list(value)
  try:
    seeds = tuple(int(str(item).strip()) for item in items)
  except ValueError:
    seeds = ()
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise ValueError(f"{setting}: expected distinct non-negative integers such as 0,1,2, got "
                     f"{value!r}")
  return seeds


def run(config: ml_collections.ConfigDict, workdir: str,
        seeds: Any = None) -> dict[str, Any]:
  """Trains, evaluates and reports (see the module docstring) for each of ``seeds`` (default:
  ``config.seeds``, else seed 0); returns ``recipe.json``'s content: results, baselines and wall
  times in seconds (with several seeds: each seed's under ``per_seed``, and the aggregate).
  Holds ``workdir``'s lock throughout (``xattn_vlm.lock``), as each stage holds its own
  folder's."""
  if seeds is None:
    seeds = parse_seeds(config.get("seeds", (0,)), "config.seeds")
  else:
    seeds = parse_seeds(seeds, "--seeds")
  with lock.hold(workdir, "--workdir"):
    workdir = pathlib.Path(workdir)
    if len(seeds) == 1:
      return _run(config, workdir, seeds[0])
    start = time.perf_counter()
    summaries = {}
    for seed in seeds:
      console.say(f"recipe: seed {seed} into {workdir / f'seed_{seed}'}")
      summaries[seed] = _run(config, workdir / f"seed_{seed}", seed)
      if "stopped" in summaries[seed]:
        return summaries[seed]
    combined = report.write_seeds(config, workdir, summaries, time.perf_counter() - start)
    combined["per_seed"] = {seed: {k: summaries[seed][k] for k in
                                   ("results", "image_reliance", "seconds")} for seed in seeds}
    (workdir / SUMMARY).write_text(json.dumps(combined, indent=2, default=str) + "\n")
    console.say(f"recipe: {len(seeds)} seeds done in {time.perf_counter() - start:.0f} s; "
                f"report in {workdir / report.REPORT}")
    return combined


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path, seed: int) -> dict[str, Any]:
  start = time.perf_counter()
  seconds: dict[str, float] = {}
  check(config, workdir)
  for stage in recipe_stages(config):
    began = time.perf_counter()
    stage_cfg = stage_config(config, stage, workdir, seed)
    state = trainer.train(stage_cfg, str(workdir / stage))
    seconds[stage] = time.perf_counter() - began
    if int(state.step) < stage_cfg.total_steps:  # stopped by a signal: resume, never move on
      console.say(f"recipe: stopped during {stage} at step {int(state.step)}; the same command "
                  "resumes it")
      return {"stopped": stage, "step": int(state.step)}

  flamingo = stage_config(config, "flamingo", workdir, seed)
  processor = Processor.from_model_config(flamingo.model, input_pipeline.tokenizer_for(flamingo))
  began = time.perf_counter()
  console.say(f"evaluation: {config.eval.tasks} at {', '.join(map(str, config.eval.shots))} shots "
              f"into {workdir / 'eval'}")
  model = stage_model(flamingo, state.params)
  results = runner.evaluate(model, processor, config.eval, workdir / "eval",
                            model_name="shapes_tiny")
  seconds["eval"] = time.perf_counter() - began
  console.say(f"evaluation: done after {seconds['eval']:.0f} s")

  began = time.perf_counter()
  console.say(f"baseline: {config.baseline_tasks} with the untrained model (gates at 0)")
  baseline_config = ml_collections.ConfigDict(config.eval.to_dict())
  baseline_config.tasks = config.baseline_tasks
  untrained = trainer.create_train_state(trainer.setup(flamingo))
  baselines = runner.evaluate(stage_model(flamingo, untrained.params), processor,
                              baseline_config, workdir / "eval_untrained",
                              model_name="untrained")
  seconds["eval_untrained"] = time.perf_counter() - began

  began = time.perf_counter()
  reliance = diagnostics.image_reliance(flamingo, model)
  seconds["image_reliance"] = time.perf_counter() - began
  _log.info("recipe: VQA answer NLL %.3f with own images, %.3f with swapped ones",
               reliance["own_nll"], reliance["swapped_nll"])

  summary = {"results": results, "untrained": baselines, "image_reliance": reliance}
  if config.get("binding_ceiling", False):
    began = time.perf_counter()
    console.say("binding: the text-only ceiling (every image described in words)")
    summary["binding_text"] = diagnostics.binding_text_ceiling(config.eval, model, processor)
    seconds["binding_text"] = time.perf_counter() - began
  began = time.perf_counter()
  summary.update(report.write(config, workdir, results, baselines, reliance,
                              {**seconds, "total": time.perf_counter() - start},
                              summary.get("binding_text")))
  seconds["report"] = time.perf_counter() - began
  seconds["total"] = time.perf_counter() - start
  summary["seconds"] = seconds
  (workdir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
  console.say(results_lib.markdown_table(results, model_name="trained"))
  console.say(f"recipe: done in {seconds['total']:.0f} s; report in {workdir / report.REPORT}")
  return summary
