"""A plan as text (``python -m xattn_vlm.plan``), as a Markdown table row, and as the JSON
figures a table over many targets reads (``--json``)."""

from __future__ import annotations

from typing import Any

from xattn_vlm.plan.chips import GiB, bandwidth
from xattn_vlm.plan.plans import Plan


def gib(n: float) -> str:
  return f"{n / GiB:,.2f} GiB"


def time_text(seconds: float) -> str:
  return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def report(plan: Plan) -> str:
  """The plan as the text ``python -m xattn_vlm.plan`` prints."""
  trainable, total = plan.parameters
  batches = ", ".join(f"{name} {shape['input_ids'][0]} x {shape['input_ids'][1]} tokens"
                      for name, shape in plan.batch_shapes.items())
  mem = plan.memory
  lines = [
      f"target: {plan.target}; {plan.method}",
      "mesh: " + " x ".join(f"{k} {v}" for k, v in plan.mesh_shape.items())
      + f" = {plan.num_devices} devices"
      + (f" (config.mesh {plan.fitted_from}, fitted to the target)" if plan.fitted_from else ""),
      f"parameters: {total:,} ({trainable:,} trainable); batch per step: {batches}",
      "largest parameters (shape -> sharding):",
      *[f"  {line}" for line in plan.largest],
      "memory per device:",
      f"  arguments       {mem.arguments:>18,} B  {gib(mem.arguments)}",
      f"  outputs         {mem.outputs:>18,} B  {gib(mem.outputs)}",
      f"  aliased         {mem.aliased:>18,} B  {gib(mem.aliased)}  (donated, not counted twice)",
      f"  temporaries     {mem.temporaries:>18,} B  {gib(mem.temporaries)}",
      f"  generated code  {mem.generated_code:>18,} B  {gib(mem.generated_code)}",
  ]
  if plan.chip is None:
    lines.append(f"  total           {mem.total:>18,} B  {gib(mem.total)}")
  else:
    lines.append(f"  total           {mem.total:>18,} B  {gib(mem.total)} of "
                 f"{gib(plan.device_memory)} HBM per device ({mem.total / plan.device_memory:.0%})"
                 f" -> {'fits' if plan.fits else 'DOES NOT FIT'}")
  lines.append(f"FLOPs per step: {plan.model_flops:.3e} model (analytic, all devices); "
               f"{plan.device_flops:.3e} per device as executed "
               f"(x {plan.num_devices} = {plan.device_flops * plan.num_devices:.3e})")
  if plan.chip is not None:
    lines.append(f"communication per device and step: {gib(plan.communication_bytes)} "
                 f"(analytic: FSDP gathers, gradient reduction) = "
                 f"{time_text(plan.communication_seconds)} at "
                 f"{bandwidth(plan.chip, plan.mesh_shape) * plan.device_share / 1e9:,.0f} GB/s")
  if plan.compute_seconds:
    lines.append(f"compute per step: {time_text(plan.compute_seconds)} [{plan.compute_basis}]; "
                 f"{time_text(plan.model_flops / plan.num_devices / plan.device_peak)} at 100% MFU")
  if plan.step_seconds:
    fast, slow = plan.step_seconds
    low, high = plan.mfu
    lines.append(f"predicted step time: {time_text(fast)} - {time_text(slow)} (communication fully / not "
                 f"overlapped); MFU {high:.0%} - {low:.0%} of {plan.device_peak / 1e12:,.1f} "
                 f"TFLOP/s per device ({plan.chip.name} peak)")
  if plan.seconds:
    lines.append("on this host: " + ", ".join(f"{k} {v:.1f} s" for k, v in plan.seconds.items()))
  return "\n".join(lines)


TABLE_COLUMNS = ("config", "topology", "chips", "mesh (data x fsdp x tensor)",
                 "memory per chip (of HBM)", "fits", "predicted step time", "MFU",
                 "plan time on host")


def table_header() -> str:
  """The Markdown header of the plan table (``TABLE_COLUMNS``)."""
  align = ["---:" if column in ("chips", "plan time on host") else "---" for column in TABLE_COLUMNS]
  return "| " + " | ".join(TABLE_COLUMNS) + " |\n|" + "|".join(align) + "|"


def _memory(figures: dict[str, Any]) -> str:
  if figures.get("memory_bytes") is None:
    if figures.get("state_bytes") is not None:
      return f"train state alone {gib(figures['state_bytes'])} (not compiled)"
    return "over HBM (XLA refused)" if "fits" in figures else f"error: {figures.get('error')}"
  used = figures["memory_bytes"] / GiB
  if not figures.get("device_memory_bytes"):
    return f"{used:,.1f} GiB"
  hbm = figures["device_memory_bytes"] / GiB
  return f"{used:,.1f} of {hbm:,.0f} GiB ({used / hbm:.0%})"


def table_row(config: str, topology: str, chips: float, mesh: dict[str, int],
              figures: dict[str, Any], seconds: float, smallest: bool = False) -> str:
  """One row of the plan table from a plan's ``summary`` figures (or ``{"fits": False, "error",
  "state_bytes"}`` for a step that does not fit, ``{"error"}`` for no plan); ``smallest`` puts
  the topology in bold (the smallest of its generation that fits)."""
  fits = figures.get("fits")
  step = mfu = "-"
  if fits and figures.get("step_seconds"):
    step = " - ".join(time_text(t) for t in figures["step_seconds"])
    mfu = " - ".join(f"{m:.0%}" for m in figures["mfu"])
  mesh_text = "x".join(str(v) for v in figures.get("mesh", mesh).values())
  name = f"**{topology}**" if smallest else topology
  return (f"| {config} | {name} | {chips:g} | {mesh_text} | {_memory(figures)} | "
          f"{'yes' if fits else 'no' if fits is not None else '?'} | {step} | {mfu} | "
          f"{seconds:.0f} s |")


def summary(plan: Plan) -> dict[str, Any]:
  """The plan's headline figures as JSON-ready values (``python -m xattn_vlm.plan --json``): what
  a table over many targets needs, without the compiled step."""
  return dict(
      target=plan.target, mesh=plan.mesh_shape, devices=plan.num_devices,
      chips=plan.num_devices * plan.device_share,
      chip=None if plan.chip is None else plan.chip.name,
      memory_bytes=plan.memory.total, device_memory_bytes=plan.device_memory, fits=plan.fits,
      model_flops=plan.model_flops, device_flops=plan.device_flops,
      compute_seconds=plan.compute_seconds, communication_seconds=plan.communication_seconds,
      step_seconds=plan.step_seconds, mfu=plan.mfu, host_seconds=plan.seconds)


def does_not_fit_message(plan: Plan) -> str:
  return (f"does not fit: the step needs {gib(plan.memory.total)} per device on {plan.target}, "
          f"which has {gib(plan.device_memory)}; use more chips, shard more (config.mesh.fsdp, "
          f"config.mesh.tensor) or split each batch (config.microbatches)")
