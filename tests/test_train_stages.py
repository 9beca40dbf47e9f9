"""The three stages of the recipe chained with one trainer (tiny config): LM pretraining,
contrastive vision pretraining, then Flamingo with both towers loaded from those runs and frozen."""

import jax
import numpy as np
import pytest

from helpers import leaves, tiny
from xattn_vlm.train import metrics as metrics_lib
from xattn_vlm.train import trainer


@pytest.mark.slow
def test_three_stages_chain(tmp_path, monkeypatch):
  steps = {"total_steps": 2}
  lm = trainer.train(tiny("lm_pretrain", **steps), str(tmp_path / "lm"))
  dual = trainer.train(tiny("vision_pretrain", **steps), str(tmp_path / "vision"))
  for stage in ("lm", "vision"):
    rows = metrics_lib.read_metrics(str(tmp_path / stage))
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
  assert "temperature" in rows[-1]

  config = tiny("flamingo", **steps, **{"init.lm_workdir": str(tmp_path / "lm"),
                                        "init.vision_workdir": str(tmp_path / "vision"),
                                        "plots": True})
  flamingo = trainer.train(config, str(tmp_path / "flamingo"))
  for tower, expected in (("lm", leaves(lm.params)), ("vision", leaves(dual.params["vision"]))):
    got = leaves(flamingo.params[tower])
    assert got.keys() == expected.keys()
    for name in expected:
      np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{tower}/{name}")
  assert (tmp_path / "flamingo" / "loss.png").exists()
  assert (tmp_path / "flamingo" / "gates.png").exists()

  # The loaded towers are not outputs of the jitted init, so their random init is never computed.
  out_shardings, jit = {}, jax.jit
  def recording_jit(fun, *args, **kwargs):
    out_shardings[fun.__name__] = kwargs.get("out_shardings")
    return jit(fun, *args, **kwargs)
  with monkeypatch.context() as patch:
    patch.setattr(jax, "jit", recording_jit)
    state = trainer.create_train_state(trainer.setup(config))
  assert not {"lm", "vision"} & set(out_shardings["init"].params)
  assert {"lm", "vision", "resampler"} <= set(state.params)

  config.model.lm.num_layers = 3
  with pytest.raises(ValueError, match=r"config\.init\.lm_workdir=.* holds a different lm"):
    trainer.train(config, str(tmp_path / "flamingo_3_layers"))
