"""Device mesh, logical-axis rules and the shardings of parameters, optimizer state and batches.

Parameters carry logical axis names (``out_sharding`` metadata, see ``models.layers``); the
config's rules map each name to mesh axes. A dimension that a mesh axis does not divide, or a mesh
axis already used by an earlier dimension, stays unsharded along that axis (logged), so one rules
table serves every model size. ``check_fsdp`` then refuses a run that asked for FSDP but would
replicate a large parameter.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from xattn_vlm.train.configs import MESH_AXES

_log = logging.getLogger(__name__)

Rules = Mapping[str, tuple[str, ...]]


def _mesh_sizes(mesh_config: ml_collections.ConfigDict) -> list[int]:
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: expected positive sizes with at most one -1 (the rest), got "
                     f"data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}")
  return sizes


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Axis sizes (data, fsdp, tensor) with at most one -1 resolved to the rest of the devices."""
  sizes = _mesh_sizes(mesh_config)
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f"config.mesh: data x fsdp x tensor = {known} (ignoring -1) must divide the "
                     f"{num_devices} devices; set sizes whose product divides {num_devices}")
  return tuple(num_devices // known if s == -1 else s for s in sizes)


def fitted_mesh_shape(mesh_config: ml_collections.ConfigDict,
                      num_devices: int) -> tuple[int, int, int]:
  """``mesh_shape``, or, when the config's mesh does not divide ``num_devices`` (a config written
  for a larger slice), that mesh fitted to them: ``tensor`` kept, ``fsdp`` the largest divisor of
  the devices left per DCN slice that is at most the config's (all of them for -1), ``data`` the
  rest. Raises ``ValueError`` naming ``config.mesh`` when ``tensor`` cannot be kept."""
  sizes = _mesh_sizes(mesh_config)
  if not num_devices % math.prod(s for s in sizes if s != -1):
    return mesh_shape(mesh_config, num_devices)
  _, fsdp, tensor = sizes
  slices = int(mesh_config.dcn_data)
  if slices < 1 or num_devices % slices:
    raise ValueError(f"config.mesh.dcn_data={slices}: expected a number of slices that divides "
                     f"the {num_devices} devices")
  per_slice = num_devices // slices
  where = f"the {per_slice} devices" + (" of each slice" if slices > 1 else "")
  if tensor == -1 or per_slice % tensor:
    raise ValueError(f"config.mesh: data x fsdp x tensor = {sizes[0]} x {fsdp} x {tensor} does not "
                     f"fit {num_devices} devices, and tensor={tensor} cannot be kept on {where}; "
                     f"set config.mesh.tensor to a divisor of {per_slice}")
  rest = per_slice // tensor
  fsdp = rest if fsdp == -1 else max(d for d in range(1, min(fsdp, rest) + 1) if rest % d == 0)
  return num_devices // (fsdp * tensor), fsdp, tensor


def create_mesh(mesh_config: ml_collections.ConfigDict,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh with Auto axis types.

  A mesh smaller than the device count (on one process) uses the first devices, which lets a test
  compare one device with eight. ``dcn_data`` > 1 lays ``data`` over that many slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  size = math.prod(shape)
  if size < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f"config.mesh: a multi-process run must use all {len(devices)} devices, "
                       f"got a mesh of {size}; use -1 for one axis")
    _log.warning("config.mesh %s uses %d of %d devices", shape, size, len(devices))
    devices = devices[:size]
  dcn = int(mesh_config.dcn_data)
  if dcn > 1:
    if shape[0] % dcn:
      raise ValueError(f"config.mesh.dcn_data={dcn} must divide mesh data={shape[0]}")
    ici = (shape[0] // dcn, shape[1], shape[2])
    device_array = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices)
  else:
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_rules(rules: Sequence[Sequence[Any]]) -> dict[str, tuple[str, ...]]:
  """The config's ``(logical, mesh axes | None)`` pairs as ``logical -> tuple of mesh axes``."""
  parsed = {}
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"config.sharding.rules: expected (logical_name, mesh_axes) pairs, got "
                       f"{rule!r}")
    name, axes = rule
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"config.sharding.rules: {name!r} maps to unknown mesh axes {unknown}; "
                       f"mesh axes are {MESH_AXES}")
    parsed[name] = axes
  return parsed


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], rules: Rules,
                    mesh_sizes: Mapping[str, int], where: str = "") -> P:
  """A PartitionSpec for an array with logical axis names; see the module docstring."""
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"config.sharding.rules has no rule for logical axis {name!r} (of {where}); "
                       f"add ({name!r}, <mesh axes or None>)")
    axes = [a for a in rules[name] if a not in used and mesh_sizes[a] > 1]
    while axes and dim % math.prod(mesh_sizes[a] for a in axes):
      _log.info("%s: dim %s=%d is not divisible by mesh axis %r; not sharded along it", where,
                   name, dim, axes[-1])
      axes.pop()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*spec)


def path_name(path) -> str:
  """'lm/blocks/0/attn/query/kernel' for a pytree path (the Variable's ``.value`` dropped)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
      parts.append(key.name)
  return "/".join(parts)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_shardings(abstract: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """NamedShardings for a (possibly abstract) state of Variables, same structure."""
  sizes = dict(mesh.shape)

  def one(path, variable):
    logical = variable.get_metadata().get("out_sharding") or (None,) * variable.get_value().ndim
    spec = logical_to_spec(logical, variable.get_value().shape, rules, sizes, path_name(path))
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, abstract, is_leaf=_is_variable)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state,
                        params_sharding: nnx.State, mesh: Mesh):
  """Optimizer-state shardings: moments shard like their parameters, counters are replicated."""
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt_state,
                               params_sharding, transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def describe(abstract: nnx.State, shardings: nnx.State, top: int = 8) -> list[str]:
  """Lines 'path shape -> spec' for the ``top`` largest parameters, largest first."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract)
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  rows = sorted(zip(leaves, specs), key=lambda r: -math.prod(r[0][1].shape))[:top]
  return [f"{path_name(path)} {tuple(x.shape)} -> {s.spec}" for (path, x), s in rows]


def check_fsdp(abstract: nnx.State, shardings: nnx.State, mesh: Mesh, min_size: int) -> None:
  """Raises when ``mesh.fsdp`` > 1 but a parameter of ``min_size`` elements or more is not sharded
  over ``fsdp`` (it would be replicated on every FSDP shard, defeating FSDP)."""
  if mesh.shape["fsdp"] <= 1:
    return
  leaves = jax.tree_util.tree_leaves_with_path(abstract)
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, x), sharding in zip(leaves, specs):
    if math.prod(x.shape) < min_size:
      continue
    used = {a for entry in sharding.spec if entry for a in
            ((entry,) if isinstance(entry, str) else entry)}
    if "fsdp" not in used:
      raise ValueError(
          f"config.mesh.fsdp={mesh.shape['fsdp']} but parameter {path_name(path)} "
          f"{tuple(x.shape)} ({math.prod(x.shape):,} elements >= config.sharding.fsdp_min_size="
          f"{min_size:,}) is not sharded over fsdp (spec {sharding.spec}); map one of its logical "
          f"axes to 'fsdp' in config.sharding.rules or pick an fsdp size that divides it")


def activation_constraint(mesh: Mesh, rules: Rules) -> Callable[[jax.Array, Sequence], jax.Array]:
  """The constraint ``models.layers.activation_sharding`` applies to activations: their logical
  names through the same rules as the parameters' (the batch over data x fsdp, heads and mlp
  over tensor), an axis the rules do not name unsharded."""
  sizes = dict(mesh.shape)

  def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    named = {name: rules.get(name, ()) for name in logical if name is not None}
    spec = logical_to_spec(logical, x.shape, named, sizes, "an activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return constrain


def batch_spec(rules: Rules, mesh: Mesh) -> P:
  """The leading-axis sharding of every batch array: the 'batch' rule's mesh axes."""
  axes = tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)
  return P(axes if axes else None)


def data_parallel_size(rules: Rules, mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in rules.get("batch", ()))


def global_batch(local: Mapping[str, Mapping[str, np.ndarray]], mesh: Mesh,
                 spec: P) -> dict[str, dict[str, jax.Array]]:
  """This process's slice of every dataset's batch -> global arrays sharded along the batch."""
  def one(x):
    sharding = NamedSharding(mesh, P(*spec, *([None] * (x.ndim - 1))))
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(one, {name: dict(batch) for name, batch in local.items()})
