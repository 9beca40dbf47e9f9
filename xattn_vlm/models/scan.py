"""Scanned layers (``config.model.scan_layers``): a list of identical blocks kept as one block
whose parameters are stacked along a leading ``layers`` axis (MaxText's layout), so a deep model
traces and compiles one block instead of all of them.

The stacks are the LM's ``blocks`` and the vision tower's and resampler's ``layers``
(``STACKS``). ``layout`` converts any tree holding them (a model's state, a train state with its
optimizer moments, a checkpoint's restore target) between the scanned and the unrolled layout
(``0 .. n-1``); both hold the same numbers, so converting is exact both ways.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

STACKS = ("blocks", "layers")


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  """One module whose parameters hold every module's (identical modules), stacked along a
  leading ``layers`` axis."""
  graphdef = nnx.split(modules[0])[0]
  return nnx.merge(graphdef, stack_states([nnx.split(module)[1] for module in modules]))


def run(stacked: nnx.Module, step: Callable[[nnx.Module, Any], Any], carry: Any) -> Any:
  """``carry = step(layer, carry)`` for each layer of ``stacked``, under ``lax.scan``."""
  graphdef, state = nnx.split(stacked)
  body = lambda carry, layer_state: (step(nnx.merge(graphdef, layer_state), carry), None)
  return jax.lax.scan(body, carry, state)[0]


def unstack(stacked: nnx.Module) -> list[nnx.Module]:
  """The layers of ``stacked`` one by one (for decoding with a cache, layer by layer)."""
  graphdef, state = nnx.split(stacked)
  count = jax.tree.leaves(state)[0].shape[0]
  return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(count)]


def _is_unrolled(stack: Mapping) -> bool:
  return all(str(key).isdigit() for key in stack)


def _with_layers_axis(sharding, add: bool):
  """A NamedSharding with the unsharded ``layers`` dimension put first (or taken off)."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  return jax.sharding.NamedSharding(sharding.mesh, P(None, *spec) if add else P(*spec[1:]))


def _stack_leaves(*leaves):
  first = leaves[0]
  if isinstance(first, nnx.Variable):
    stacked = first.replace(_stack_leaves(*[leaf.get_value() for leaf in leaves]))
    axes = first.get_metadata().get("out_sharding")
    if axes:
      stacked.set_metadata(out_sharding=("layers", *axes))
    return stacked
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype,
                                sharding=_with_layers_axis(first.sharding, add=True))
  return jnp.stack(leaves)


def _slice_leaf(leaf, i: int):
  if isinstance(leaf, nnx.Variable):
    sliced = leaf.replace(_slice_leaf(leaf.get_value(), i))
    axes = leaf.get_metadata().get("out_sharding")
    if axes and axes[0] == "layers":
      sliced.set_metadata(out_sharding=tuple(axes[1:]))
    return sliced
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype,
                                sharding=_with_layers_axis(leaf.sharding, add=False))
  return leaf[i]


def _items(mapping: Mapping):
  """A mapping's items, a State's children as it holds them (plain dicts stay dicts)."""
  return (mapping.raw_mapping if isinstance(mapping, nnx.State) else mapping).items()


_IS_LEAF = lambda x: isinstance(x, (nnx.Variable, jax.ShapeDtypeStruct))


def stack_states(states: Sequence[Any]) -> Any:
  """Like trees (modules' states, arrays, ShapeDtypeStructs) stacked along a new leading
  ``layers`` axis, parameter metadata included."""
  return jax.tree.map(_stack_leaves, *states, is_leaf=_IS_LEAF)


def _stack_as(stack: Mapping, scanned: bool) -> Mapping:
  if _is_unrolled(stack) == (not scanned):
    return stack
  if scanned:
    return stack_states([stack[key] for key in sorted(stack, key=int)])
  count = jax.tree.leaves(stack, is_leaf=_IS_LEAF)[0].shape[0]
  unrolled = {i: jax.tree.map(lambda x, i=i: _slice_leaf(x, i), stack, is_leaf=_IS_LEAF)
              for i in range(count)}
  return nnx.State(unrolled) if isinstance(stack, nnx.State) else unrolled


def layout(tree: Any, scanned: bool) -> Any:
  """``tree`` with every stack (``STACKS``) in the scanned layout or the unrolled one: arrays
  stacked or sliced, ShapeDtypeStructs and parameter metadata given the other layout's shape
  and sharding."""
  if isinstance(tree, Mapping):
    items = {key: _stack_as(value, scanned) if key in STACKS and isinstance(value, Mapping)
             else layout(value, scanned) for key, value in _items(tree)}
    return nnx.State(items) if isinstance(tree, nnx.State) else items
  children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
  if jax.tree_util.treedef_is_leaf(treedef):
    return tree
  return treedef.unflatten([layout(child, scanned) for child in children])


def scanned_layout(tree: Any) -> bool | None:
  """Whether the stacks in ``tree`` are in the scanned layout (None: it holds none)."""
  if isinstance(tree, Mapping):
    for key, value in _items(tree):
      found = (not _is_unrolled(value) if key in STACKS and isinstance(value, Mapping)
               else scanned_layout(value))
      if found is not None:
        return found
    return None
  children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
  if jax.tree_util.treedef_is_leaf(treedef):
    return None
  return next((f for f in map(scanned_layout, children) if f is not None), None)
