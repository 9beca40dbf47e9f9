"""``benchmarks/plan_table.py``: the README's table of plans over configs and TPU topologies."""

from benchmarks import plan_table


def test_planned_mesh_is_the_preset_fitted_to_the_topology():
  assert plan_table.planned_mesh("flamingo_80b", "mesh=tpu", 2048) == dict(data=2, fsdp=128,
                                                                           tensor=8)
  assert plan_table.planned_mesh("flamingo_80b", "mesh=tpu", 512) == dict(data=1, fsdp=64,
                                                                          tensor=8)
  assert plan_table.chips("v5p:4x4x8") == 128 and plan_table.chips("v5e:16x16") == 256


def test_table_bolds_the_smallest_topology_that_fits():
  chips = plan_table.chips

  def cell(topology, used, fits):
    figures = dict(mesh=dict(data=1, fsdp=chips(topology), tensor=1), fits=fits,
                   memory_bytes=used * 2**30, device_memory_bytes=16 * 2**30,
                   step_seconds=[2.0, 3.0], mfu=[0.2, 0.3])
    return plan_table.Cell("m", topology, figures["mesh"], figures, seconds=60)

  refused = plan_table.Cell("m", "v5e:2x2", dict(data=1, fsdp=4, tensor=1),
                            dict(fits=False, error="does not fit: XLA cannot place the step"))
  refused.error = refused.figures["error"]
  table = plan_table.markdown([refused, cell("v5e:2x4", 17, False), cell("v5e:4x4", 12, True),
                               cell("v5e:4x8", 8, True)]).splitlines()
  assert table[2] == "| m | v5e:2x2 | 4 | 1x4x1 | over HBM (XLA refused) | no | - | - | 0 s |"
  assert table[3] == "| m | v5e:2x4 | 8 | 1x8x1 | 17.0 of 16 GiB (106%) | no | - | - | 60 s |"
  assert table[4] == ("| m | **v5e:4x4** | 16 | 1x16x1 | 12.0 of 16 GiB (75%) | yes | 2 s - 3 s "
                      "| 20% - 30% | 60 s |")
  assert table[5].startswith("| m | v5e:4x8 | 32 |")


def test_plans_each_topology_in_a_subprocess_until_one_fits():
  """The tiny config fits 4 v5e chips: the larger slice is not planned (after_fit=0)."""
  cells = plan_table.plan_all(["tiny_test"], "flamingo", ["v5e:2x4", "v5e:2x2"], after_fit=0)
  assert [c.topology for c in cells] == ["v5e:2x2"]
  (cell,) = cells
  assert cell.fits and cell.error == "", cell.error
  assert cell.figures["mesh"] == dict(data=4, fsdp=1, tensor=1) and cell.figures["chips"] == 4
  assert cell.figures["chip"] == "TPU v5e" and 0 < cell.figures["mfu"][0] <= cell.figures["mfu"][1]
  assert "| tiny_test | **v5e:2x2** | 4 | 4x1x1 |" in plan_table.markdown(cells)
