"""A Flamingo model split once into its graph and its parameters, for compiled inference.

``nnx.jit`` walks the module graph on every call: tens of milliseconds for the bench-small model,
a large share of a whole generation call. Inference therefore splits the model once
(``InferenceModel``) and calls plain ``jax.jit`` functions of (graph, params, inputs), the graph
static, so a call costs one compiled dispatch. The parameters may be sharded over a mesh: the
compiled functions follow their shardings.
"""

from __future__ import annotations

from flax import nnx

from xattn_vlm.models.flamingo import Flamingo


class StaticGraph:
  """A model's ``GraphDef`` as a static ``jax.jit`` argument.

  GraphDefs compare by value but cannot be hashed (the model keeps its ConfigDict), so every
  ``StaticGraph`` hashes alike and jit's cache tells graphs apart by equality: equal graphs (the
  same architecture, e.g. sharded and unsharded copies) share compiled code.
  """

  def __init__(self, graphdef: nnx.GraphDef):
    self.graphdef = graphdef

  def __hash__(self) -> int:
    return 0

  def __eq__(self, other) -> bool:
    # Identity first: jit compares on every call, and a deep comparison costs milliseconds.
    return isinstance(other, StaticGraph) and (self.graphdef is other.graphdef
                                               or self.graphdef == other.graphdef)

  def merge(self, params: nnx.State) -> Flamingo:
    return nnx.merge(self.graphdef, params)


class InferenceModel:
  """A Flamingo model split into ``graph`` (static) and ``params`` (arrays, possibly sharded).

  Build it once and pass it to ``generate`` / ``generate_tokens`` / ``score`` in loops; they also
  take a ``Flamingo`` and split it on each call (one graph walk per call).
  """

  def __init__(self, model: Flamingo):
    graphdef, self.params = nnx.split(model)
    self.graph = StaticGraph(graphdef)
    self.config = model.config
    self.media_token_id = model.media_token_id
    self.eoc_token_id = model.eoc_token_id


def as_inference_model(model: Flamingo | InferenceModel) -> InferenceModel:
  return model if isinstance(model, InferenceModel) else InferenceModel(model)
