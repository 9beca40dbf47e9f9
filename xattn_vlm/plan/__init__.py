"""Plans of a training step for a target machine, made on this host (MaxText's train_compile).

``compile.compile_plan`` compiles the trainer's own update step for a TPU topology (or this host's
CPU devices) and reads XLA's memory and cost analyses; ``analytic.analytic_plan`` is the
estimate for GPU clusters, which XLA cannot compile for here. Both add ``plans.communication_bytes``,
an analytic count of what FSDP moves per device and step (parameter all-gathers in every pass,
gradient reduction), at the chip's interconnect bandwidth (``chips``); the predicted step time
is the range from perfect overlap, max(compute, communication), to none, compute +
communication. ``report`` renders a plan; ``python -m xattn_vlm.plan`` is the command.
"""
