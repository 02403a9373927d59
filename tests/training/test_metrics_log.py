"""The run log: metrics.jsonl records, images/s per interval, and which intervals include compilation."""

import json

from kdjax.training.metrics_log import MetricsLog, read_records


def test_intervals_after_evaluation_are_not_marked_as_compiling(tmp_path, capsys):
    log = MetricsLog(tmp_path, total_steps=20, global_batch_size=4, label="run ", tensorboard=False)
    log.start(0)
    log.write(5, {"loss": 1.0})
    log.write(10, {"loss": 0.5})
    log.write(10, {"miou": 12.5}, prefix="val")
    log.start(10, compiles=False)
    log.write(15, {"loss": 0.25})
    log.close()
    lines = capsys.readouterr().err.splitlines()
    assert [("(incl. compile)" in line) for line in lines] == [True, False, False]
    assert all(line.startswith("run [") and "img/s" in line for line in lines)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "train", "val", "train"]
    assert all(r["images_per_second"] > 0 for r in records if r["split"] == "train")
    assert "images_per_second" not in records[2] and records[2]["miou"] == 12.5


def test_records_of_a_resumed_run_are_one_per_step_the_latest(tmp_path):
    assert read_records(tmp_path, "val") == []
    lines = [{"split": "train", "step": 1, "loss": 3.0}, {"split": "val", "step": 2, "miou": 5.0},
             {"split": "val", "step": 4, "miou": 6.0},
             # resumed from step 2: steps 3 and 4 logged again
             {"split": "val", "step": 4, "miou": 7.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert [(r["step"], r["miou"]) for r in read_records(tmp_path, "val")] == [(2, 5.0), (4, 7.0)]
    assert [r["step"] for r in read_records(tmp_path, "train")] == [1]
