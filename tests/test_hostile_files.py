"""Hostile checkpoints (tests/checkpoint_fuzz.py): a fixed-seed, time-bounded run of the fuzzer
over every file int4kit's checkpoint code reads, in a separate process so that a crash or a hang
is a failure of this test rather than of the test session. Longer runs:
`python tests/checkpoint_fuzz.py --cases 5000 --seed N` (docs/RELIABILITY.md)."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CASES, SEED, BUDGET_S = 3000, 20261206, 300


def test_hostile_checkpoints_fail_cleanly(tmp_path):
    summary_path = tmp_path / "summary.json"
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "checkpoint_fuzz.py"), "--cases", str(CASES),
         "--seed", str(SEED), "--budget", str(BUDGET_S), "--json", str(summary_path),
         "--keep", str(tmp_path / "failing")],
        capture_output=True, text=True, env=env, timeout=BUDGET_S + 300)
    assert result.returncode in (0, 1), f"the fuzzer died ({result.returncode}):\n" \
                                        f"{result.stderr[-3000:]}"
    summary = json.loads(summary_path.read_text())
    assert summary["failures"] == [], json.dumps(summary["failures"], indent=1)
    assert summary["cases"] >= 1000, summary  # the budget left room for a real campaign
    # every kind of damage and every seed was tried
    assert set(summary["mutations"]) >= {
        "truncate", "bitflip", "pickle", "header_flip", "inflate", "lie_shape", "lie_dtype",
        "lie_offsets", "deep_metadata", "data_flip", "deep_json", "lie_config", "lie_index"}, \
        summary["mutations"]
    assert set(summary["seeds"]) == {"native", "sharded", "hf", "gptq", "gptq_bin", "awq",
                                     "gptq_legacy", "awq_legacy", "gptq_bin_sharded", "ct"}
    assert summary["counts"]["clear"] > summary["cases"] // 2
