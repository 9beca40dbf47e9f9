"""Results: trial summaries, results.json, the Markdown table, and the resumable prediction log."""

import json

import pytest

from xattn_vlm.eval import results

RESULTS = {"coco": {4: [80.0, 82.0, 84.0], 0: [70.0]}, "imagenet": {0: [10.0, 12.0]}}


def test_summarize_trials_mean_and_population_std():
  summary = results.summarize_trials([80.0, 82.0, 84.0])
  # mean 82; deviations -2, 0, 2; population variance (4 + 0 + 4) / 3.
  assert summary.mean == 82.0
  assert summary.std == pytest.approx((8 / 3) ** 0.5)
  assert summary.trials == (80.0, 82.0, 84.0)
  with pytest.raises(ValueError, match="at least one"):
    results.summarize_trials([])
  with pytest.raises(ValueError, match="finite"):
    results.summarize_trials([1.0, float("nan")])


def test_write_results_json(tmp_path):
  path = tmp_path / "run" / "results.json"
  results.write_results_json(path, RESULTS, metadata={"model": "tiny"})
  body = json.loads(path.read_text())
  assert body["metadata"] == {"model": "tiny"}
  assert list(body["results"]["coco"]) == ["0", "4"]  # shots in increasing order
  assert body["results"]["coco"]["4"]["mean"] == 82.0
  assert body["results"]["imagenet"]["0"] == {"mean": 11.0, "std": 1.0, "trials": [10.0, 12.0]}


def test_markdown_table_puts_published_figures_beside_ours():
  table = results.markdown_table(RESULTS, compare_with=["OF-3B", "Flamingo-80B"])
  assert table == (
      "| task | model | 0-shot | 4-shot |\n"
      "|---|---|---|---|\n"
      "| COCO | ours | 70.0 ± 0.0 | 82.0 ± 1.6 |\n"
      "| COCO | OF-3B [1] | 74.9 | 77.3 |\n"
      "| COCO | Flamingo-80B [2] | 84.3 | 103.2 |\n"
      "| ImageNet | ours | 11.0 ± 1.0 | — |\n"
      "\n"
      "[1] OpenFlamingo paper Table 11 (random demonstrations).\n"
      "[2] Flamingo paper (Alayrac et al. 2022).\n")
  with pytest.raises(ValueError, match="compare_with"):
    results.markdown_table(RESULTS, compare_with=["GPT-4"])


def test_published_table_is_complete():
  for model in ("Flamingo-3B", "Flamingo-9B", "OF-3B", "OF-4B", "OF-9B"):
    assert len(results.PUBLISHED[model]) == 7
    assert all(set(row) == {0, 4, 8, 16, 32} for row in results.PUBLISHED[model].values())
  assert results.PUBLISHED["OF-9B"]["vqav2"][4] == 54.8
  assert results.PUBLISHED["Flamingo-9B"]["coco"][32] == 106.3


def test_prediction_log_resumes_after_a_crash(tmp_path):
  path = tmp_path / "preds.jsonl"
  ids = ["q1", "q2", 3, "q4"]
  log = results.PredictionLog(path)
  assert log.pending(ids) == ids
  log.write([{"id": "q1", "answer": "cat"}, {"id": "q2", "answer": "caf\u00e9\u2028x"}])
  # A crash in the middle of the next write leaves half a line behind.
  with open(path, "a") as f:
    f.write('{"id": 3, "ans')

  resumed = results.PredictionLog(path)
  assert resumed.pending(ids) == [3, "q4"]
  assert resumed.records["q2"]["answer"] == "caf\u00e9\u2028x"
  resumed.write([{"id": 3, "answer": "dog"}, {"id": "q4", "answer": "2"}])
  assert resumed.pending(ids) == []
  with pytest.raises(ValueError, match="already logged"):
    resumed.write([{"id": "q1", "answer": "again"}])

  final = results.PredictionLog(path)
  assert {k: r["answer"] for k, r in final.records.items()} == {
      "q1": "cat", "q2": "caf\u00e9\u2028x", 3: "dog", "q4": "2"}
  assert path.read_bytes().count(b"\n") == 4 and path.read_bytes().endswith(b"\n")  # no fragment


def test_prediction_log_rejects_bad_records(tmp_path):
  log = results.PredictionLog(tmp_path / "preds.jsonl")
  with pytest.raises(KeyError, match="'id'"):
    log.write([{"answer": "cat"}])
  with pytest.raises(TypeError, match="str or int"):
    log.write([{"id": (1, 2), "answer": "cat"}])
  with pytest.raises(ValueError, match="already logged"):
    log.write([{"id": 1}, {"id": 1}])
  assert len(log) == 0
  (tmp_path / "bad.jsonl").write_text('{"id": 1}\nnot json\n{"id": 2}\n')
  with pytest.raises(ValueError, match="line 2"):
    results.PredictionLog(tmp_path / "bad.jsonl")
